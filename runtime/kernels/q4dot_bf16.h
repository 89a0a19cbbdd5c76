/* One token's factored int4 groups of a bf16 model summed by AVX512-BF16 dot products (vdpbf16ps), where the
 * CPU has it: the codes become the bf16 words of (code - 8) by two byte-table lookups (vpshufb) and multiply
 * the bf16 inputs as they are, 64 products per two instructions, with fp32 sums.
 *
 * Why: q4planes.h's integer way needs six 256-bit vpdpbusd per 64 weights (the input as three byte planes,
 * for exact sums of any bf16 input); AMD Zen 4 runs 512-bit operations as two 256-bit halves, so those are
 * about two vector operations a cycle however they are written. Measured with the arithmetic alone
 * (bench/diagnostics/int4_arith.c, four rows, L1): 27.6-28.9 G weights/s on one thread the planes way,
 * 32.4-32.7 this way (docs/benchmarks.md).
 *
 * Exactness: a group's weights are scale * (code - 8) with the scale taken out of the sum (dequant.h: every
 * such product is a bf16 when the scale has at most 5 significant bits, as the quantizer stores them), and
 * (code - 8) * x is exact in fp32 for a bf16 x: vdpbf16ps adds exact products into fp32 lanes, rounding each
 * addition, another order of the reference's fp32 sums. It treats bf16 subnormal inputs as zero (as the bf16
 * kernel's vdpbf16ps does; their products are below 2^-126).
 *
 * Layout of the input words (in a prepared input row's plane region, 2K bytes of its 3K): per pair of groups
 * (64 inputs), the words in the order the lookups give the weights: word i of the pair is input
 * q4dot_input(i) of it. The weights of byte j of a pair are inputs 2j (low nibble) and 2j + 1 (high); the
 * codes vector holds the 32 low nibbles then the 32 high ones, and vpunpcklbw / vpunpckhbw take bytes 0-7 and
 * 8-15 of each 128-bit lane: the first dot product's words (i < 32), then the second's. 128-bit lanes 0 and 2
 * of the sums hold group 2p's products, lanes 1 and 3 group 2p + 1's. */
#ifndef MOEPLAN_Q4DOT_BF16_H
#define MOEPLAN_Q4DOT_BF16_H
#include <immintrin.h>
#include <stdint.h>

#include "bf16.h"
#include "stream_access.h" /* PREFETCH_BYTES, STREAMS */

#define Q4DOT_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c"

/* The input (0-63 within its pair of groups) behind word i of the pair. */
static inline int q4dot_input(int i) {
    const int half = i / 32, j = i % 32, b = 16 * (j / 8) + 8 * half + j % 8;
    return b < 32 ? 2 * b : 2 * (b - 32) + 1;
}

/* The words of one pair of groups: v its 64 inputs in order (bf16 values held as fp32: exact). */
static inline void q4dot_place_pair(const float *v, uint16_t *words) {
    for (int i = 0; i < 64; i++) words[i] = f32_to_bf16(v[q4dot_input(i)]);
}

/* For each of n rows, `pairs` pairs of groups from pair p0 on (codes at byte 32 * p of w[r], words at
 * 64 * p of xw[r]), each pair's sums times its two scales (lanes 2 * (p - p0) and 2 * (p - p0) + 1 of
 * scales[r]), added into acc[r] (16 fp32 lanes, summed by the caller). n a constant where it is inlined. */
__attribute__((target(Q4DOT_TARGET), always_inline)) static inline void q4dot_rows(
    const uint8_t *const *w, const uint16_t *const *xw, const float (*scales)[8], float (*acc)[16], const int n,
    const int64_t p0, const int64_t pairs) {
    /* bf16(code - 8) for the 16 codes: their low bytes and their high bytes, in each 128-bit lane */
    const __m512i tlo = _mm512_broadcast_i32x4(_mm_setr_epi8(0x00, (char)0xe0, (char)0xc0, (char)0xa0, (char)0x80, 0x40,
                                                             0x00, (char)0x80, 0x00, (char)0x80, 0x00, 0x40, (char)0x80,
                                                             (char)0xa0, (char)0xc0, (char)0xe0));
    const __m512i thi = _mm512_broadcast_i32x4(_mm_setr_epi8((char)0xc1, (char)0xc0, (char)0xc0, (char)0xc0, (char)0xc0,
                                                             (char)0xc0, (char)0xc0, (char)0xbf, 0x00, 0x3f, 0x40, 0x40,
                                                             0x40, 0x40, 0x40, 0x40));
    const __m512i nib = _mm512_set1_epi8(15);
    __m512 a[STREAMS], sv[STREAMS];
    for (int r = 0; r < n; r++) {
        a[r] = _mm512_loadu_ps(acc[r]);
        sv[r] = _mm512_castps256_ps512(_mm256_loadu_ps(scales[r]));
    }
    for (int64_t p = 0; p < pairs; p++) {
        /* group 2p's scale in 128-bit lanes 0 and 2, group 2p + 1's in lanes 1 and 3 */
        const int s0 = (int)(2 * p), s1 = s0 + 1;
        const __m512i idx = _mm512_setr_epi32(s0, s0, s0, s0, s1, s1, s1, s1, s0, s0, s0, s0, s1, s1, s1, s1);
        const int64_t at = p0 + p;
        for (int r = 0; r < n; r++) {
            if (!(at & 1)) _mm_prefetch((const char *)(w[r] + 32 * at) + PREFETCH_BYTES, _MM_HINT_NTA);
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w[r] + 32 * at));
            const __m512i c = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1), nib);
            const __m512i lo = _mm512_shuffle_epi8(tlo, c), hi = _mm512_shuffle_epi8(thi, c);
            const __m512bh w0 = (__m512bh)_mm512_unpacklo_epi8(lo, hi), w1 = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xw[r] + 64 * at);
            const __m512bh x1 = (__m512bh)_mm512_loadu_si512(xw[r] + 64 * at + 32);
            const __m512 d = _mm512_dpbf16_ps(_mm512_dpbf16_ps(_mm512_setzero_ps(), w0, x0), w1, x1);
            a[r] = _mm512_fmadd_ps(d, _mm512_permutexvar_ps(idx, sv[r]), a[r]);
        }
    }
    for (int r = 0; r < n; r++) _mm512_storeu_ps(acc[r], a[r]);
}

/* q4dot_rows for STREAMS rows and for one (the accumulators in registers: n a constant). */
__attribute__((target(Q4DOT_TARGET), noinline)) static void q4dot_streams(const uint8_t *const *w,
                                                                         const uint16_t *const *xw,
                                                                         const float (*scales)[8], float (*acc)[16],
                                                                         const int64_t p0, const int64_t pairs) {
    q4dot_rows(w, xw, scales, acc, STREAMS, p0, pairs);
}

__attribute__((target(Q4DOT_TARGET), noinline)) static void q4dot_single(const uint8_t *const *w,
                                                                        const uint16_t *const *xw,
                                                                        const float (*scales)[8], float (*acc)[16],
                                                                        const int64_t p0, const int64_t pairs) {
    q4dot_rows(w, xw, scales, acc, 1, p0, pairs);
}

#endif
