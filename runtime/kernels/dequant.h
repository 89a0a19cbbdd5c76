/* AVX2 dequantization of int8 and int4 expert weights (the layout of runtime/contracts/expert_format.py):
 * w = float(scale) * q, and, for a bf16 model, rounded to bf16 as the reference's dequantized weights are
 * (bf16(float(scale) * q)), so that the kernels multiply exactly the reference's weights and differ from
 * its matmul only in the order of the fp32 sums; and, for scales where that product is a bf16 already,
 * the scale taken out of a group's sum instead (the same weights, less work per weight). */
#ifndef MOEPLAN_DEQUANT_H
#define MOEPLAN_DEQUANT_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* The int kernels' target: qgemv_vnni.c compiles qgemv.c a second time with AVX512-VNNI on 256-bit registers
 * (AVX512-VL), where q4planes.h sums with vpdpbusd. */
#ifdef QGEMV_VNNI
#define INT_TARGET "avx2,fma,f16c,avx512vnni,avx512vl"
#else
#define INT_TARGET "avx2,fma,f16c"
#endif
#define AVX2_INLINE __attribute__((target(INT_TARGET), always_inline)) static inline

/* Each lane rounded to bf16 precision (nearest, ties to even, as torch's float -> bf16), kept as fp32.
 * Adding M = sign(v) * 2^(e + 16), e the lane's exponent, leaves an fp32 sum whose last place is v's
 * bf16 last place, so the fp32 adder rounds v there (to nearest even), and subtracting M is exact:
 * four operations, one fewer than the integer rounding of bf16.h. Finite normal lanes and zero only
 * (float16 scales times small integers never leave them). */
AVX2_INLINE __m256 round_bf16_avx2(__m256 v) {
    const __m256i bits = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32((int)0xFF800000u));
    const __m256 m = _mm256_castsi256_ps(_mm256_add_epi32(bits, _mm256_set1_epi32(16 << 23)));
    return _mm256_sub_ps(_mm256_add_ps(v, m), m);
}

AVX2_INLINE __m128 round_bf16_sse(__m128 v) {
    const __m128i bits = _mm_and_si128(_mm_castps_si128(v), _mm_set1_epi32((int)0xFF800000u));
    const __m128 m = _mm_castsi128_ps(_mm_add_epi32(bits, _mm_set1_epi32(16 << 23)));
    return _mm_sub_ps(_mm_add_ps(v, m), m);
}

/* Eight consecutive int8 weights times their scale s. */
AVX2_INLINE __m256 dequant_i8(const int8_t *q, __m256 s, const int to_bf16) {
    const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q))), s);
    return to_bf16 ? round_bf16_avx2(v) : v;
}

/* ---- int8 with the scale factored out of a group --------------------------------------------------------
 * sum_k bf16(s * q_k) x_k equals s * sum_k q_k x_k, bar the order and place of the fp32 roundings, exactly
 * when every s * q_k is a bf16 already: always for an fp32 model (s * q has at most 11 + 7 significant bits,
 * fp32 keeps 24), and for a bf16 model when s is zero or plus or minus a power of two (q has at most 7
 * significant bits, bf16 keeps 8). Then a group costs a widening, a conversion and an FMA per 8 weights
 * (q_k x_k is exact in fp32 for a bf16 input) and one FMA by s per group, where the per-weight
 * dequantization costs a multiply and the four-operation bf16 rounding more: the kernels take it group by
 * group wherever it holds, so a checkpoint whose scales are powers of two (runtime/quant_format.py's int8
 * rule) runs fast and any other one runs the per-weight path, with no flag in the format. */

/* Whether each of these fp32 scales (widened float16s) is zero or +-2^e: no mantissa bits. */
AVX2_INLINE int scales_factor_exactly(__m256 s) {
    return _mm256_testz_si256(_mm256_castps_si256(s), _mm256_set1_epi32(0x007FFFFF));
}

/* Eight consecutive int8 codes as fp32 (exact). */
AVX2_INLINE __m256 codes_i8(const int8_t *q) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q)));
}

/* Sixteen int4 weights (eight bytes) of one scale s: the eight even inputs (low nibbles) into *even and the
 * eight odd ones (high nibbles) into *odd. minus8s = -8 * s: code * s + minus8s is s * (code - 8) exactly
 * (both products are exact in fp32: 4-bit codes times 11-bit float16 mantissas), one FMA. */
AVX2_INLINE void dequant_i4(const uint8_t *q, __m256 s, __m256 minus8s, __m256 *even, __m256 *odd,
                            const int to_bf16) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
    const __m256 e = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15))), s, minus8s);
    const __m256 o = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), s, minus8s);
    *even = to_bf16 ? round_bf16_avx2(e) : e;
    *odd = to_bf16 ? round_bf16_avx2(o) : o;
}

/* Eight int4 weights (four bytes) of one scale: four even, four odd; for group sizes that are not a
 * multiple of 16 (a 16-input step would straddle two groups). */
AVX2_INLINE void dequant_i4_half(const uint8_t *q, __m128 s, __m128 minus8s, __m128 *even, __m128 *odd,
                                 const int to_bf16) {
    int32_t word;
    memcpy(&word, q, sizeof word);
    const __m128i b = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(word));
    const __m128 e = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_and_si128(b, _mm_set1_epi32(15))), s, minus8s);
    const __m128 o = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_srli_epi32(b, 4)), s, minus8s);
    *even = to_bf16 ? round_bf16_sse(e) : e;
    *odd = to_bf16 ? round_bf16_sse(o) : o;
}

/* ---- int4 weights of a bf16 model by table: groups of a multiple of 32 inputs -------------------------
 * The reference's weight bf16(s * q) is, for s = sign * 2^e * m (m in [1, 2): the float16 mantissa),
 * sign * 2^e * bf16(m * q): scaling by a power of two commutes with rounding. So one table per float16
 * mantissa (1024 of them) holds bf16(m * (code - 8)) for the 16 codes, and a group's weights are two byte
 * lookups (vpshufb: the low and high bytes of the bf16s) per 32 inputs, the exact products t * x are summed
 * per group in fp32 and the group's sum is multiplied by sign * 2^e, which is exact: the same weights as
 * the reference, summed in another order, at about half the vector operations of dequant_i4 with its
 * rounding. Each table is 64 bytes: the low bytes of the 16 values twice (both 128-bit lanes), then the
 * high bytes twice. */
extern uint8_t q4_bf16_tables[1024][64];

/* Up to eight float16 scales (count of them, the rest read as zero) as fp32 (scales8), or, for the table
 * path, as each one's table offset in bytes (its mantissa's) and its sign * 2^e (q4_scales8): vcvtph2ps
 * normalises subnormal scales, and a zero scale gives a zero sign * 2^e. */
AVX2_INLINE __m256 load_scales8(const uint16_t *sc, int64_t count) {
    if (count >= 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sc));
    uint16_t part[8] = {0};
    memcpy(part, sc, (size_t)count * sizeof *sc);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)part));
}

AVX2_INLINE void q4_scales8(__m256 scales, int32_t *offset, float *mult) {
    const __m256i bits = _mm256_castps_si256(scales);
    const __m256i mant = _mm256_and_si256(_mm256_srli_epi32(bits, 13), _mm256_set1_epi32(1023));
    _mm256_storeu_si256((__m256i *)offset, _mm256_slli_epi32(mant, 6));
    _mm256_storeu_ps(mult, _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32((int)0xFF800000u))));
}

/* The 32 inputs of a 32-input block of codes q (16 bytes), against the input block x laid out as
 * q4tab_slot says, added into ge and go (fp32, unscaled: the caller multiplies by sign * 2^e). */
AVX2_INLINE void q4tab_weights(const uint8_t *q, const uint8_t *table, __m256 w[4]) {
    const __m128i b = _mm_loadu_si128((const __m128i *)q);
    const __m256i codes = _mm256_and_si256(_mm256_inserti128_si256(_mm256_castsi128_si256(b), _mm_srli_epi16(b, 4), 1),
                                           _mm256_set1_epi8(15)); /* lane 0: inputs 0, 2, .., 30; lane 1: 1, 3, .., 31 */
    const __m256i lo = _mm256_shuffle_epi8(_mm256_load_si256((const __m256i *)table), codes);
    const __m256i hi = _mm256_shuffle_epi8(_mm256_load_si256((const __m256i *)(table + 32)), codes);
    const __m256i u0 = _mm256_unpacklo_epi8(lo, hi), u1 = _mm256_unpackhi_epi8(lo, hi); /* the bf16s */
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    w[0] = _mm256_castsi256_ps(_mm256_slli_epi32(u0, 16));
    w[1] = _mm256_castsi256_ps(_mm256_and_si256(u0, high));
    w[2] = _mm256_castsi256_ps(_mm256_slli_epi32(u1, 16));
    w[3] = _mm256_castsi256_ps(_mm256_and_si256(u1, high));
}

AVX2_INLINE void q4tab_block(const uint8_t *q, const uint8_t *table, const float *x, __m256 *ge, __m256 *go) {
    __m256 w[4];
    q4tab_weights(q, table, w);
    *ge = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(x), *ge);
    *go = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x + 8), *go);
    *ge = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x + 16), *ge);
    *go = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x + 24), *go);
}

/* One 32-input group's unscaled sum, for a group of exactly one block (G = 32): no zeroed accumulators. */
AVX2_INLINE __m256 q4tab_group32(const uint8_t *q, const uint8_t *table, const float *x) {
    __m256 w[4];
    q4tab_weights(q, table, w);
    const __m256 e = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x + 16), _mm256_mul_ps(w[0], _mm256_loadu_ps(x)));
    const __m256 o = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x + 24), _mm256_mul_ps(w[1], _mm256_loadu_ps(x + 8)));
    return _mm256_add_ps(e, o);
}

/* ---- int4 with the whole scale factored out of a 32-input group ----------------------------------------
 * s * q is a bf16 already when s has at most 5 significant bits (|q| <= 8 has at most 3; bf16 keeps 8):
 * runtime/quant_format.py's int4 rule rounds its scales so. Then a group is s * sum_k q_k x_k (q_k x_k exact
 * in fp32 for a bf16 input), summed by q4planes.h with integer multiply-adds, without the table's byte
 * shuffles, which are the table path's bottleneck on AMD Zen 3 (two pipes do every shuffle and shift). */

/* Whether each of these fp32 scales (widened float16s) has at most 5 significant bits (or is zero). */
AVX2_INLINE int scales_5_bits(__m256 s) {
    return _mm256_testz_si256(_mm256_castps_si256(s), _mm256_set1_epi32(0x0007FFFF));
}

/* Where input i of a 32-input block goes in the block's prepared inputs, for q4tab_block: its four vectors
 * hold inputs {0,4,8,12, 1,5,9,13}, {2,6,10,14, 3,7,11,15}, then the same plus 16. */
static inline int q4tab_slot(int i) {
    const int half = i >> 4, r = i & 15, odd = (r >> 1) & 1, lane = (r >> 2) + 4 * (r & 1);
    return 8 * (2 * half + odd) + lane;
}

#endif
