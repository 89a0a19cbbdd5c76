/* int4 groups of 32 with the scale factored out (dequant.h: every float(scale) * q is a bf16 already), summed
 * with integer multiply-adds against the inputs held as fixed point in three byte planes.
 *
 * Why: the float way (widen the codes to 32-bit lanes, convert, multiply by fp32 inputs) costs about 18
 * vector operations per 32 weights, which bounds a thread at about 10 G weights per second from DRAM on
 * AMD Zen 3, half of what the memory gives int4. vpmaddubsw multiplies 32 unsigned codes by 32 signed bytes
 * in one operation, so an input held as bytes costs a few operations per plane.
 *
 * Exactness: each 32-input group g of a prepared input is x_k = X_k * 2^-e_g with X_k an integer of at most
 * 22 bits and sign, e_g chosen from the group's largest |x| (its top bit lands on bit 21), X_k the nearest
 * integer to x_k * 2^e_g. A bf16 input of at least 2^-14 times its group's largest magnitude is held
 * exactly (8 significant bits); a smaller one is rounded to a multiple of about 2^-22 of the largest, an
 * error of the order of the fp32 sums' own rounding of the same group (bench/results/cpu_kernel_int_avx2.md). Then sum_k q_k x_k = 2^-e_g (sum_k c_k X_k - 8 sum_k X_k) with
 * c_k = q_k + 8 the stored code, computed in 32-bit integers without overflow (below) and scaled once per
 * group: the kernels multiply the reference's weights, as before, and differ from its sums by less than the
 * summation-order tolerance the tests hold every path to.
 *
 * X_k = hi * 2^16 + mid * 2^8 + lo with lo, mid, hi signed bytes (|hi| <= 64). Per plane, c * byte <= 15 * 128
 * = 1920; vpmaddubsw adds two (3840, no saturation), the even- and odd-nibble halves are added (7680), vpmaddwd
 * adds two more lanes: |plane sum| <= 15360 per 32-bit lane, and hi's times 2^16 is below 2^30. With
 * AVX512-VNNI (qgemv_vnni.c) a pair's vpdpbusd sums the same four products per 32-bit lane at once.
 *
 * Layout of a prepared input row of K (K a multiple of 32), after its K table-layout floats (qgemv.c):
 *   planes: per pair of groups (2p, 2p + 1), 192 bytes: for each plane (lo, mid, hi) 64 bytes, the 32 even
 *           inputs (16 of group 2p, then 16 of 2p + 1, in order) then the 32 odd ones; a last lone group
 *           uses the first 16 bytes of each 32;
 *   scale:  2^-e_g per group, as fp32, padded with zeros to a multiple of eight groups;
 *   offset: 8 * sum_k X_k * 2^-e_g per group, fp32, padded likewise. */
#ifndef MOEPLAN_Q4PLANES_H
#define MOEPLAN_Q4PLANES_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "dequant.h" /* AVX2_INLINE */

#define Q4P_PAIR_BYTES 192

static inline int64_t q4p_groups8(int64_t K) { return ((K / 32 + 7) / 8) * 8; }

/* Bytes of the planes of an input row of K (a last lone group takes a whole pair's room). */
static inline int64_t q4p_plane_bytes(int64_t K) { return (K / 64 + (K % 64 != 0)) * Q4P_PAIR_BYTES; }

/* Floats the planes, scales and offsets of an input row of K take (after its K table-layout floats). */
static inline int64_t q4p_floats(int64_t K) { return q4p_plane_bytes(K) / 4 + 2 * q4p_groups8(K); }

/* The per-group scales 2^-e_g of a row's plane region `row` (the offsets follow, q4p_groups8(K) later). */
static inline float *q4p_scales(int64_t K, const int8_t *row) { return (float *)(row + q4p_plane_bytes(K)); }

/* Codes of one weight byte vector as the unsigned operands: the even inputs (low nibbles), the odd ones. */
AVX2_INLINE void q4p_nibbles(__m256i v, __m256i *even, __m256i *odd) {
    const __m256i nib = _mm256_set1_epi8(15);
    *even = _mm256_and_si256(v, nib);
    *odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
}

/* sum_k c_k X_k of two groups (32 bytes of codes, xp their pair of planes): lanes 0-3 the first group's
 * partial sums, lanes 4-7 the second's. */
AVX2_INLINE __m256i q4p_pair(const uint8_t *q, const int8_t *xp) {
    __m256i even, odd;
    q4p_nibbles(_mm256_loadu_si256((const __m256i *)q), &even, &odd);
    __m256i p[3];
#ifdef QGEMV_VNNI /* vpdpbusd: four byte products summed into each 32-bit lane in one operation */
    for (int plane = 0; plane < 3; plane++)
        p[plane] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), even,
                                                           _mm256_loadu_si256((const __m256i *)(xp + 64 * plane))),
                                       odd, _mm256_loadu_si256((const __m256i *)(xp + 64 * plane + 32)));
    return _mm256_add_epi32(_mm256_add_epi32(p[0], _mm256_slli_epi32(p[1], 8)), _mm256_slli_epi32(p[2], 16));
#else
    for (int plane = 0; plane < 3; plane++)
        p[plane] = _mm256_add_epi16(_mm256_maddubs_epi16(even, _mm256_loadu_si256((const __m256i *)(xp + 64 * plane))),
                                    _mm256_maddubs_epi16(odd, _mm256_loadu_si256((const __m256i *)(xp + 64 * plane + 32))));
    const __m256i lo_mid = _mm256_add_epi32(_mm256_madd_epi16(p[0], _mm256_set1_epi16(1)),
                                            _mm256_madd_epi16(p[1], _mm256_set1_epi16(256)));
    return _mm256_add_epi32(lo_mid, _mm256_slli_epi32(_mm256_madd_epi16(p[2], _mm256_set1_epi16(1)), 16));
#endif
}

/* The same for a lone group (16 bytes of codes): four partial sums. */
AVX2_INLINE __m128i q4p_single(const uint8_t *q, const int8_t *xp) {
    const __m128i v = _mm_loadu_si128((const __m128i *)q), nib = _mm_set1_epi8(15);
    const __m128i even = _mm_and_si128(v, nib), odd = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
    __m128i p[3];
    for (int plane = 0; plane < 3; plane++)
        p[plane] = _mm_add_epi16(_mm_maddubs_epi16(even, _mm_loadu_si128((const __m128i *)(xp + 64 * plane))),
                                 _mm_maddubs_epi16(odd, _mm_loadu_si128((const __m128i *)(xp + 64 * plane + 32))));
    const __m128i lo_mid = _mm_add_epi32(_mm_madd_epi16(p[0], _mm_set1_epi16(1)), _mm_madd_epi16(p[1], _mm_set1_epi16(256)));
    return _mm_add_epi32(lo_mid, _mm_slli_epi32(_mm_madd_epi16(p[2], _mm_set1_epi16(1)), 16));
}

/* Group g of an input row (v: its 32 values in order) into the planes, scale and offset of `row`, laid out
 * as above (row: the plane region of the prepared input, K inputs). An all-zero group gets scale 0; a group
 * with an inf or nan gets nan scale and offset, so the row's sums come out nan as the reference's would.
 * A group whose largest |x| is below 2^-104 is held at 2^-126 granularity (fp32 has no smaller normal scale). */
static inline void q4p_prepare_group(const float *v, int64_t g, int64_t K, int8_t *row) {
    int8_t *planes = row + (g / 2) * Q4P_PAIR_BYTES + (g & 1) * 16;
    float *scale = q4p_scales(K, row), *offset = scale + q4p_groups8(K);
    float top = 0.0f;
    int finite = 1;
    for (int i = 0; i < 32; i++) {
        top = fmaxf(top, fabsf(v[i]));
        finite &= isfinite(v[i]) != 0;
    }
    if (!finite) {
        for (int i = 0; i < 32; i++) planes[(i & 1) * 32 + (i >> 1)] = planes[64 + (i & 1) * 32 + (i >> 1)] =
            planes[128 + (i & 1) * 32 + (i >> 1)] = 0;
        scale[g] = offset[g] = NAN;
        return;
    }
    int top_exp = 0;
    frexpf(top, &top_exp);                    /* top in [2^(top_exp - 1), 2^top_exp) */
    int e = top == 0.0f ? 0 : 22 - top_exp;   /* |X| < 2^22 */
    if (e > 126) e = 126;
    const float up = ldexpf(1.0f, e);
    int64_t sum = 0;
    for (int i = 0; i < 32; i++) {
        const int32_t X = (int32_t)lrintf(v[i] * up); /* exact for a bf16 of at least 2^-14 times the top */
        const int32_t lo = (int8_t)(X & 0xFF), x1 = (X - lo) >> 8, mid = (int8_t)(x1 & 0xFF), hi = (x1 - mid) >> 8;
        const int at = (i & 1) * 32 + (i >> 1);
        planes[at] = (int8_t)lo;
        planes[64 + at] = (int8_t)mid;
        planes[128 + at] = (int8_t)hi;
        sum += X;
    }
    scale[g] = ldexpf(1.0f, -e);
    offset[g] = (float)(8 * sum) * scale[g];
}

/* Zero scales and offsets of the padding groups, so that eight groups at a time read no garbage. */
static inline void q4p_pad(int64_t K, int8_t *row) {
    float *scale = q4p_scales(K, row), *offset = scale + q4p_groups8(K);
    for (int64_t g = K / 32; g < q4p_groups8(K); g++) scale[g] = offset[g] = 0.0f;
}

#endif
