/* Up to four fp32 rows against many tokens, blocked for L1: gemv.c's fp32 path from BLOCK_TOKENS tokens,
 * and the int kernels' path for more than a few tokens, where qgemv.c dequantizes a block of rows once into
 * fp32 and multiplies it here. */
#ifndef MOEPLAN_BLOCK_F32_H
#define MOEPLAN_BLOCK_F32_H
#include <immintrin.h>
#include <stdint.h>

#include "hsum.h"

/* Why: one row against four tokens (gemv.c's rows_f32_avx2) reads four inputs per weight vector, and once
 * the tokens' inputs outgrow L1 (four tokens of K = 3584 take 57 KB) those reads come from L2 at about one
 * vector a cycle: half the FMA rate. Here four rows meet two tokens (eight sums in registers: six loads for
 * eight FMAs), over chunks of ROWS_CHUNK inputs, so that the block's chunk (16 KB) and two tokens' (8 KB)
 * stay in L1 while every token passes over them. */
#define ROWS_CHUNK 1024

/* R rows (w: row r at w + r * K) against TT tokens (x: token t at x + t * K) over inputs [k0, k1), k1 - k0 a
 * multiple of 8; each sum added to out[t * R + r]. */
__attribute__((target("avx2,fma"), always_inline))
static inline void block_f32_tile(const float *w, const float *x, float *out, int64_t K, int64_t k0, int64_t k1,
                                  const int R, const int TT) {
    __m256 a[4][2];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < TT; t++) a[r][t] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k1; k += 8) {
        __m256 xv[2];
        for (int t = 0; t < TT; t++) xv[t] = _mm256_loadu_ps(x + t * K + k);
        for (int r = 0; r < R; r++) {
            const __m256 wv = _mm256_loadu_ps(w + r * K + k);
            for (int t = 0; t < TT; t++) a[r][t] = _mm256_fmadd_ps(wv, xv[t], a[r][t]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < TT; t++) out[t * R + r] += hsum256(a[r][t]);
}

#define BLOCK_F32_TILE(R_)                                                                                  \
    do {                                                                                                    \
        if (T - t >= 2) block_f32_tile(w, x + t * K, out + t * R_, K, k0, k1, R_, 2);                       \
        else block_f32_tile(w, x + t * K, out + t * R_, K, k0, k1, R_, 1);                                  \
    } while (0)

/* Rows w [R, K] (R <= 4) against T tokens x [T, K]: out [T, R], fp32 sums. */
__attribute__((target("avx2,fma")))
static void block_f32_tokens(const float *w, int R, const float *x, float *out, int64_t K, int64_t T) {
    const int64_t K8 = K & ~(int64_t)7;
    for (int64_t t = 0; t < T; t++)
        for (int r = 0; r < R; r++) {
            float s = 0.0f;
            for (int64_t j = K8; j < K; j++) s += w[r * K + j] * x[t * K + j];
            out[t * R + r] = s;
        }
    for (int64_t k0 = 0; k0 < K8; k0 += ROWS_CHUNK) {
        const int64_t k1 = K8 - k0 < ROWS_CHUNK ? K8 : k0 + ROWS_CHUNK;
        for (int64_t t = 0; t < T; t += 2) switch (R) {
                case 1: BLOCK_F32_TILE(1); break;
                case 2: BLOCK_F32_TILE(2); break;
                case 3: BLOCK_F32_TILE(3); break;
                default: BLOCK_F32_TILE(4); break;
            }
    }
}

#endif
