/* One fp32 weight row against a few tokens: gemv.c's fp32 path, and the int kernels' path for more than
 * a few tokens, where qgemv.c dequantizes a row once into fp32 and then runs it here. */
#ifndef MOEPLAN_ROW_F32_H
#define MOEPLAN_ROW_F32_H
#include <immintrin.h>
#include <stdint.h>

#include "hsum.h"
#include "stream_access.h" /* PREFETCH_BYTES */

/* Row w (K floats) against G <= 4 tokens (x: [G, K]): out[g * out_stride], eight weights per FMA.
 * `prefetch`: the row streams from DRAM (gemv.c), not from a scratch row that L1 holds (qgemv.c). */
__attribute__((target("avx2,fma"), always_inline))
static inline void row_f32_avx2(const float *w, const float *x, float *out, int64_t out_stride, int64_t K,
                                const int G, const int prefetch) {
    __m256 a[4], b[4];
    for (int g = 0; g < G; g++) a[g] = b[g] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        if (prefetch) _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES, _MM_HINT_NTA);
        const __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
        for (int g = 0; g < G; g++) {
            a[g] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + g * K + k), a[g]);
            b[g] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + g * K + k + 8), b[g]);
        }
    }
    for (int g = 0; g < G; g++) {
        float s = hsum256(_mm256_add_ps(a[g], b[g]));
        for (int64_t j = k; j < K; j++) s += w[j] * x[g * K + j];
        out[g * out_stride] = s;
    }
}

/* Row w against T tokens (x: [T, K]), up to four per pass over the row (it stays in L1 between passes). */
__attribute__((target("avx2,fma")))
static inline void row_f32_tokens(const float *w, const float *x, float *out, int64_t out_stride, int64_t K,
                                  int64_t T, const int prefetch) {
    for (int64_t t = 0; t < T; t += 4) {
        const float *xt = x + t * K;
        float *o = out + t * out_stride;
        switch (T - t < 4 ? T - t : 4) {
            case 1: row_f32_avx2(w, xt, o, out_stride, K, 1, prefetch); break;
            case 2: row_f32_avx2(w, xt, o, out_stride, K, 2, prefetch); break;
            case 3: row_f32_avx2(w, xt, o, out_stride, K, 3, prefetch); break;
            default: row_f32_avx2(w, xt, o, out_stride, K, 4, prefetch); break;
        }
    }
}

/* ---- a block of up to four fp32 rows against many tokens, blocked for L1 --------------------------------
 * One row against four tokens (row_f32_tokens) reads four inputs per weight vector, and once the tokens'
 * inputs outgrow L1 (four tokens of K = 3584 take 57 KB) those reads come from L2 at about one vector a
 * cycle: half the FMA rate. Here four rows meet two tokens (eight sums in registers: six loads for eight
 * FMAs), over chunks of ROWS_CHUNK inputs, so that the block's chunk (16 KB) and two tokens' (8 KB) stay in
 * L1 while every token passes over them. */
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
