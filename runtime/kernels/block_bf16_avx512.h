/* bf16 rows against a few to many bf16 tokens with AVX512-BF16 dot products, blocked for L1: gemv.c's bf16
 * path from two tokens on AVX-512, and the int kernels' path for more than a few tokens of a bf16 model on
 * such a CPU, where qgemv.c dequantizes a block of rows into bf16 (exactly the reference's weights) first. */
#ifndef MOEPLAN_BLOCK_BF16_AVX512_H
#define MOEPLAN_BLOCK_BF16_AVX512_H
#include <immintrin.h>
#include <stdint.h>

#include "bf16.h"
#include "block_f32.h" /* ROWS_CHUNK */

/* AVX-512 bf16 from two tokens: R <= 4 rows against four tokens at a time (sixteen AVX512-BF16 accumulators,
 * eight loads per sixteen dot products), over chunks of ROWS_CHUNK inputs so that the rows' chunk (8 KB)
 * and four tokens' (8 KB) stay in L1 while every token group passes over them. The inputs are the bf16 rows
 * themselves. */
__attribute__((target("avx512f,avx512bf16"), always_inline))
static inline void block_bf16_tile_avx512(const uint16_t *w, const uint16_t *x, float *out, int64_t K, int64_t k0,
                                          int64_t k1, const int R, const int TT) {
    __m512 a[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < TT; t++) a[r][t] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k1; k += 32) {
        __m512bh xv[4];
        for (int t = 0; t < TT; t++) xv[t] = (__m512bh)_mm512_loadu_si512((const void *)(x + t * K + k));
        for (int r = 0; r < R; r++) {
            const __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w + r * K + k));
            for (int t = 0; t < TT; t++) a[r][t] = _mm512_dpbf16_ps(a[r][t], wv, xv[t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < TT; t++) out[t * R + r] += _mm512_reduce_add_ps(a[r][t]);
}

#define BLOCK_BF16_TILE_AVX512(R_)                                                                  \
    do {                                                                                            \
        switch (T - t < 4 ? T - t : 4) {                                                            \
            case 1: block_bf16_tile_avx512(w, x + t * K, out + t * R_, K, k0, k1, R_, 1); break;    \
            case 2: block_bf16_tile_avx512(w, x + t * K, out + t * R_, K, k0, k1, R_, 2); break;    \
            case 3: block_bf16_tile_avx512(w, x + t * K, out + t * R_, K, k0, k1, R_, 3); break;    \
            default: block_bf16_tile_avx512(w, x + t * K, out + t * R_, K, k0, k1, R_, 4); break;   \
        }                                                                                           \
    } while (0)

/* bf16 rows w [R, K] (R <= 4) against T tokens x [T, K] (bf16): out [T, R]. */
__attribute__((target("avx512f,avx512bf16")))
static void block_bf16_tokens_avx512(const uint16_t *w, int R, const uint16_t *x, float *out, int64_t K, int64_t T) {
    const int64_t K32 = K & ~(int64_t)31;
    for (int64_t t = 0; t < T; t++)
        for (int r = 0; r < R; r++) {
            float s = 0.0f;
            for (int64_t j = K32; j < K; j++) s += bf16_to_f32(w[r * K + j]) * bf16_to_f32(x[t * K + j]);
            out[t * R + r] = s;
        }
    for (int64_t k0 = 0; k0 < K32; k0 += ROWS_CHUNK) {
        const int64_t k1 = K32 - k0 < ROWS_CHUNK ? K32 : k0 + ROWS_CHUNK;
        for (int64_t t = 0; t < T; t += 4) switch (R) {
                case 1: BLOCK_BF16_TILE_AVX512(1); break;
                case 2: BLOCK_BF16_TILE_AVX512(2); break;
                case 3: BLOCK_BF16_TILE_AVX512(3); break;
                default: BLOCK_BF16_TILE_AVX512(4); break;
            }
    }
}

#endif
