/* Matrix-vector products for CPU expert work at small token counts: y[t, n] = sum_k W[n, k] * x[t, k].
 *
 * At one to a few tokens an expert's time is the time to stream its weights from DRAM once. One call
 * computes the same projection for several experts of a layer (one OpenMP region, rows of all experts
 * split across the threads), so the missed experts of a layer run in parallel without a thread barrier
 * per expert. Threads come from torch's own libgomp (same SONAME: one pool).
 * W is row-major [N, K]; x is [T, K] with T <= MAXT; y is fp32 [T, N].
 * bf16 uses AVX512-BF16 dot products with fp32 accumulation; fp32 uses AVX-512 FMAs. The caller checks
 * the CPU flags before calling (see runtime/kernels/__init__.py).
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define MAXT 8
#define ROWS 4 /* rows per work item: four accumulator chains hide the dot-product latency */

int gemv_max_tokens(void) { return MAXT; }

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

__attribute__((target("avx512f,avx512bf16")))
static void rows_bf16(const uint16_t *W, const uint16_t *x, float *y, int64_t n0, int64_t rows, int64_t N,
                      int64_t K, int64_t T) {
    const int64_t K32 = K & ~(int64_t)31;
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *xt = x + t * K;
        __m512 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K32; k += 32) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(xt + k));
            for (int r = 0; r < rows; r++)
                acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)_mm512_loadu_si512((const void *)(W + (n0 + r) * K + k)), xv);
        }
        for (int r = 0; r < rows; r++) {
            float s = _mm512_reduce_add_ps(acc[r]);
            const uint16_t *w = W + (n0 + r) * K;
            for (int64_t k = K32; k < K; k++) s += bf16_to_f32(w[k]) * bf16_to_f32(xt[k]);
            y[t * N + n0 + r] = s;
        }
    }
}

__attribute__((target("avx512f")))
static void rows_f32(const float *W, const float *x, float *y, int64_t n0, int64_t rows, int64_t N, int64_t K,
                     int64_t T) {
    const int64_t K16 = K & ~(int64_t)15;
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * K;
        __m512 acc[ROWS];
        for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K16; k += 16) {
            __m512 xv = _mm512_loadu_ps(xt + k);
            for (int r = 0; r < rows; r++) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(W + (n0 + r) * K + k), xv, acc[r]);
        }
        for (int r = 0; r < rows; r++) {
            float s = _mm512_reduce_add_ps(acc[r]);
            const float *w = W + (n0 + r) * K;
            for (int64_t k = K16; k < K; k++) s += w[k] * xt[k];
            y[t * N + n0 + r] = s;
        }
    }
}

/* For each of `count` experts i: y[i] = x[i] @ W[i]^T, with T[i] tokens (<= MAXT). For T > 1 the weight
 * rows are read once per token but stay in cache between tokens (a work item is ROWS rows). */
void gemv_multi(int is_bf16, int count, const void **W, const void **x, float **y, const int64_t *T, int64_t N,
                int64_t K, int threads) {
    const int64_t blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < (int64_t)count * blocks; item++) {
        const int i = (int)(item / blocks);
        const int64_t n0 = (item % blocks) * ROWS;
        const int64_t rows = N - n0 < ROWS ? N - n0 : ROWS;
        if (is_bf16)
            rows_bf16((const uint16_t *)W[i], (const uint16_t *)x[i], y[i], n0, rows, N, K, T[i]);
        else
            rows_f32((const float *)W[i], (const float *)x[i], y[i], n0, rows, N, K, T[i]);
    }
}
