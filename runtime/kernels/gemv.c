/* Matrix-vector products for CPU expert work at small token counts: y[t, n] = sum_k W[n, k] * x[t, k].
 *
 * At one to a few tokens an expert's time is the time to stream its weights from DRAM once. One call
 * computes the same projection for several experts of a layer (one OpenMP region, rows of all experts
 * split across the threads), so the missed experts of a layer run in parallel without a thread barrier
 * per expert. Threads come from torch's own libgomp (same SONAME: one pool).
 * W is row-major [N, K]; x is [T, K] with T <= MAXT; y is [T, N], fp32 or rounded to bf16.
 *
 * Two instruction sets, chosen by the caller from the CPU flags (runtime/kernels/__init__.py):
 * - AVX-512: bf16 with AVX512-BF16 dot products, fp32 with 512-bit FMAs;
 * - AVX2 + FMA: bf16 widened to fp32 in registers (a bf16 is the top half of an fp32), fp32 with
 *   256-bit FMAs. Both accumulate in fp32.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#include "bf16.h"
#include "hsum.h"

#define MAXT 64
#define ROWS 4 /* rows per work item: four accumulator chains hide the FMA latency */
/* AVX2 paths: software prefetch this far ahead of the row being read, with the non-temporal hint since
 * each weight byte is read once per token (measured: K = 1024 rows went from 9 to about 16 GB/s on two
 * AMD Zen 3 cores; 512-4096 bytes and the T0 hint were within that machine's noise) */
#define PREFETCH_BYTES 1024
/* AVX2 paths, one token: rows at least this long are read four at a time, each input load shared by the
 * four (Mixtral-8x7B experts, two AMD Zen 3 cores, kernel / plain read of the same bytes: bf16 0.85 -> 0.89
 * in 2 MB pages and 0.75 -> 0.89 in 4 KB, fp32 0.87 -> 0.92 and 0.87 -> 1.03; bench/kernel_rows_ab/run.sh).
 * Shorter rows keep to one at a time: four short streams at once give the hardware prefetcher too little
 * to follow (2 KB bf16 rows fell from 0.85 to 0.6). The benchmark builds the kernel without the path by
 * defining LONG_ROW_BYTES. */
#ifndef LONG_ROW_BYTES
#define LONG_ROW_BYTES 8192
#endif
#define ISA_AVX2 1
#define ISA_AVX512 2

int gemv_max_tokens(void) { return MAXT; }

/* ---- AVX-512 ---------------------------------------------------------------------------------- */

__attribute__((target("avx512f,avx512bf16")))
static void rows_bf16_avx512(const uint16_t *W, const uint16_t *x, float *y, int64_t n0, int64_t rows, int64_t N,
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
static void rows_f32_avx512(const float *W, const float *x, float *y, int64_t n0, int64_t rows, int64_t N, int64_t K,
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

/* ---- AVX2 + FMA ------------------------------------------------------------------------------- */

/* One weight row against G tokens (G <= 4), reading the row once, front to back: one sequential stream
 * per thread, which the hardware prefetcher follows (interleaving several short rows splits it into short
 * streams and, measured at K = 1024, halves the rate; long rows go four at a time: rows4_bf16_avx2).
 * The bf16 input is given split into its even and odd elements as fp32: a 32-bit lane of a bf16 vector
 * holds one even element (low half) and one odd element (high half), so shifting the lane left by 16
 * gives the even one as an fp32 and masking it gives the odd one: two FMAs per 16 weights, no unpacking.
 * At G = 1 the row is split across two accumulator pairs so that four FMA chains run at once. */
__attribute__((target("avx2,fma"), always_inline))
static inline void row_bf16_avx2(const uint16_t *w, const float *xe, const float *xo, int64_t half, float *out,
                                 int64_t out_stride, int64_t K, const int G) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 ae[4], ao[4], be = _mm256_setzero_ps(), bo = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) ae[g] = ao[g] = _mm256_setzero_ps();
    int64_t k = 0;
    if (G == 1)
        for (; k + 32 <= K; k += 32) {
            _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES, _MM_HINT_NTA);
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + k));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + k + 16));
            ae[0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)), _mm256_loadu_ps(xe + k / 2), ae[0]);
            ao[0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(w0, high)), _mm256_loadu_ps(xo + k / 2), ao[0]);
            be = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)), _mm256_loadu_ps(xe + k / 2 + 8), be);
            bo = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(w1, high)), _mm256_loadu_ps(xo + k / 2 + 8), bo);
        }
    for (; k + 16 <= K; k += 16) {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + k));
        const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
        const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, high));
        for (int g = 0; g < G; g++) {
            ae[g] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xe + g * half + k / 2), ae[g]);
            ao[g] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xo + g * half + k / 2), ao[g]);
        }
    }
    for (int g = 0; g < G; g++) {
        __m256 a = _mm256_add_ps(ae[g], ao[g]);
        if (G == 1) a = _mm256_add_ps(a, _mm256_add_ps(be, bo));
        float s = hsum256(a);
        for (int64_t j = k; j < K; j++) s += bf16_to_f32(w[j]) * ((j & 1) ? xo[g * half + j / 2] : xe[g * half + j / 2]);
        out[g * out_stride] = s;
    }
}

/* Four consecutive long rows of W against one token (K a multiple of 16): y[0..3]. */
__attribute__((target("avx2,fma")))
static void rows4_bf16_avx2(const uint16_t *W, const float *xe, const float *xo, float *y, int64_t K) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 ae[4], ao[4];
    for (int r = 0; r < 4; r++) ae[r] = ao[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __m256 e = _mm256_loadu_ps(xe + k / 2), o = _mm256_loadu_ps(xo + k / 2);
        for (int r = 0; r < 4; r++) {
            const uint16_t *w = W + r * K + k;
            _mm_prefetch((const char *)w + PREFETCH_BYTES, _MM_HINT_NTA);
            const __m256i wv = _mm256_loadu_si256((const __m256i *)w);
            ae[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(wv, 16)), e, ae[r]);
            ao[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(wv, high)), o, ao[r]);
        }
    }
    for (int r = 0; r < 4; r++) y[r] = hsum256(_mm256_add_ps(ae[r], ao[r]));
}

__attribute__((target("avx2,fma")))
static void rows_bf16_avx2(const uint16_t *W, const float *xe, const float *xo, float *y, int64_t n0, int64_t rows,
                           int64_t N, int64_t K, int64_t T) {
    const int64_t half = (K + 1) / 2;
    int64_t r = 0;
    if (T == 1 && K % 16 == 0 && K * 2 >= LONG_ROW_BYTES)
        for (; r + 4 <= rows; r += 4) rows4_bf16_avx2(W + (n0 + r) * K, xe, xo, y + n0 + r, K);
    for (; r < rows; r++) {
        const uint16_t *w = W + (n0 + r) * K;
        for (int64_t t = 0; t < T; t += 4) {  /* up to four tokens per pass over the row (it stays in L1) */
            const float *e = xe + t * half, *o = xo + t * half;
            float *out = y + t * N + n0 + r;
            switch (T - t < 4 ? T - t : 4) {
                case 1: row_bf16_avx2(w, e, o, half, out, N, K, 1); break;
                case 2: row_bf16_avx2(w, e, o, half, out, N, K, 2); break;
                case 3: row_bf16_avx2(w, e, o, half, out, N, K, 3); break;
                default: row_bf16_avx2(w, e, o, half, out, N, K, 4); break;
            }
        }
    }
}

/* fp32: the same row-at-a-time stream, eight weights per FMA; long rows four at a time. */
__attribute__((target("avx2,fma"), always_inline))
static inline void row_f32_avx2(const float *w, const float *x, float *out, int64_t out_stride, int64_t K,
                                const int G) {
    __m256 a[4], b[4];
    for (int g = 0; g < G; g++) a[g] = b[g] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        _mm_prefetch((const char *)(w + k) + PREFETCH_BYTES, _MM_HINT_NTA);
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

/* Four consecutive long rows of W against one token (K a multiple of 8): y[0..3]. */
__attribute__((target("avx2,fma")))
static void rows4_f32_avx2(const float *W, const float *x, float *y, int64_t K) {
    __m256 a[4];
    for (int r = 0; r < 4; r++) a[r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        const __m256 xv = _mm256_loadu_ps(x + k);
        for (int r = 0; r < 4; r++) {
            const float *w = W + r * K + k;
            _mm_prefetch((const char *)w + PREFETCH_BYTES, _MM_HINT_NTA);
            a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w), xv, a[r]);
        }
    }
    for (int r = 0; r < 4; r++) y[r] = hsum256(a[r]);
}

__attribute__((target("avx2,fma")))
static void rows_f32_avx2(const float *W, const float *x, float *y, int64_t n0, int64_t rows, int64_t N, int64_t K,
                          int64_t T) {
    int64_t r = 0;
    if (T == 1 && K % 8 == 0 && K * 4 >= LONG_ROW_BYTES)
        for (; r + 4 <= rows; r += 4) rows4_f32_avx2(W + (n0 + r) * K, x, y + n0 + r, K);
    for (; r < rows; r++) {
        const float *w = W + (n0 + r) * K;
        for (int64_t t = 0; t < T; t += 4) {
            const float *xt = x + t * K;
            float *out = y + t * N + n0 + r;
            switch (T - t < 4 ? T - t : 4) {
                case 1: row_f32_avx2(w, xt, out, N, K, 1); break;
                case 2: row_f32_avx2(w, xt, out, N, K, 2); break;
                case 3: row_f32_avx2(w, xt, out, N, K, 3); break;
                default: row_f32_avx2(w, xt, out, N, K, 4); break;
            }
        }
    }
}

/* Even and odd elements of each bf16 input row, as fp32, for rows_bf16_avx2: [T, ceil(K/2)] each. */
static void split_bf16(const uint16_t *x, float *xe, float *xo, int64_t K, int64_t T) {
    const int64_t half = (K + 1) / 2;
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < K; k++)
            (k & 1 ? xo : xe)[t * half + k / 2] = bf16_to_f32(x[t * K + k]);
}

/* Rows n0 .. n0 + rows of W (a matrix with `rows` rows from there on) against x: y [T, rows] fp32. */
static void rows_block(int isa, int is_bf16, const void *W, const void *x, const float *xe, const float *xo,
                       float *y, int64_t n0, int64_t rows, int64_t K, int64_t T) {
    if (isa == ISA_AVX512) {
        if (is_bf16) rows_bf16_avx512((const uint16_t *)W + n0 * K, (const uint16_t *)x, y, 0, rows, rows, K, T);
        else rows_f32_avx512((const float *)W + n0 * K, (const float *)x, y, 0, rows, rows, K, T);
    } else if (is_bf16) {
        rows_bf16_avx2((const uint16_t *)W + n0 * K, xe, xo, y, 0, rows, rows, K, T);
    } else {
        rows_f32_avx2((const float *)W + n0 * K, (const float *)x, y, 0, rows, rows, K, T);
    }
}

/* For each of `count` experts i: y[i] = x[i] @ W[i]^T, with T[i] tokens (<= MAXT), stored as fp32 or, with
 * out_bf16, rounded to bf16 as torch's bf16 matmul output is. For T > 1 the weight rows are read once
 * per token but stay in L1 between tokens (rows_*: up to four tokens per pass over a row).
 * `scratch` (AVX2 bf16 only) holds count * 2 * max(T) * ceil(K / 2) floats for the split inputs. */
void gemv_multi(int isa, int is_bf16, int count, const void **W, const void **x, void **y, const int64_t *T,
                int64_t N, int64_t K, int threads, float *scratch, int out_bf16) {
    const int64_t blocks = (N + ROWS - 1) / ROWS;
    int64_t tmax = 0;
    for (int i = 0; i < count; i++) tmax = T[i] > tmax ? T[i] : tmax;
    const int64_t stride = tmax * ((K + 1) / 2);
    const int split = isa == ISA_AVX2 && is_bf16;
    if (split)
        for (int i = 0; i < count; i++)
            split_bf16((const uint16_t *)x[i], scratch + 2 * i * stride, scratch + (2 * i + 1) * stride, K, T[i]);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < (int64_t)count * blocks; item++) {
        const int i = (int)(item / blocks);
        const int64_t n0 = (item % blocks) * ROWS;
        const int64_t rows = N - n0 < ROWS ? N - n0 : ROWS;
        float tmp[MAXT * ROWS];  /* [T, rows] */
        rows_block(isa, is_bf16, W[i], x[i], split ? scratch + 2 * i * stride : NULL,
                   split ? scratch + (2 * i + 1) * stride : NULL, tmp, n0, rows, K, T[i]);
        for (int64_t t = 0; t < T[i]; t++)
            for (int64_t r = 0; r < rows; r++) {
                if (out_bf16) ((uint16_t *)y[i])[t * N + n0 + r] = f32_to_bf16(tmp[t * rows + r]);
                else ((float *)y[i])[t * N + n0 + r] = tmp[t * rows + r];
            }
    }
}

/* One matrix (a dense projection): gemv_multi without the caller building arrays for a single item. */
void gemv_one(int isa, int is_bf16, const void *W, const void *x, void *y, int64_t T, int64_t N, int64_t K,
              int threads, float *scratch, int out_bf16) {
    gemv_multi(isa, is_bf16, 1, &W, &x, &y, &T, N, K, threads, scratch, out_bf16);
}

/* ---- one decode token through a layer's experts, fused -----------------------------------------
 * For each expert i (weights W_in[i] [2I, H] holding gate then up, W_out[i] [H, I]):
 *   h = W_in[i] x;  m = silu(h[:I]) * h[I:];  out += w[i] * (W_out[i] m)
 * with bf16 rounding where the reference's bf16 ops round (each matmul output, silu, the product), in
 * one parallel region of three work-shared loops: a layer's misses cost one thread wake-up and no
 * Python between the steps. The caller checks that the module's gate is this one (runtime/cpu_executor.py).
 * out [H] has x's dtype (the fp32 sum rounded once, as the reference's output is); scratch holds
 * count * (4I + 2) floats. */

void moe_token(int isa, int is_bf16, int count, const void **W_in, const void **W_out, const void *x,
               const float *weights, void *out, int64_t H, int64_t I, int threads, float *scratch) {
    /* scratch: h [count][2I] fp32, then the gate output m [count][I] as the next matmul wants it:
     * fp32 (fp32, or AVX2 bf16 split into even and odd halves) or bf16 (AVX-512 bf16) */
    float *h = scratch;
    float *m = scratch + (int64_t)count * 2 * I;
    const int64_t halfH = (H + 1) / 2, halfI = (I + 1) / 2;
    const int split = isa == ISA_AVX2 && is_bf16;
    float xs[2 * halfH > 0 ? 2 * halfH : 1];  /* x split into even and odd elements (AVX2 bf16) */
    if (split) split_bf16((const uint16_t *)x, xs, xs + halfH, H, 1);
    const int64_t in_blocks = (2 * I + ROWS - 1) / ROWS, out_blocks = (H + ROWS - 1) / ROWS;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t item = 0; item < (int64_t)count * in_blocks; item++) {
            const int i = (int)(item / in_blocks);
            const int64_t n0 = (item % in_blocks) * ROWS;
            rows_block(isa, is_bf16, W_in[i], x, xs, xs + halfH, h + i * 2 * I + n0, n0,
                       2 * I - n0 < ROWS ? 2 * I - n0 : ROWS, H, 1);
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < (int64_t)count * I; item++) {
            const int64_t i = item / I, j = item % I;
            float g = h[i * 2 * I + j], u = h[i * 2 * I + I + j], v;
            if (is_bf16) {
                g = round_bf16(g);
                u = round_bf16(u);
                v = round_bf16(round_bf16(g / (1.0f + expf(-g))) * u);
            } else {
                v = g / (1.0f + expf(-g)) * u;
            }
            if (split) (j & 1 ? m + i * 2 * halfI + halfI : m + i * 2 * halfI)[j / 2] = v;
            else if (is_bf16) ((uint16_t *)m)[i * I + j] = f32_to_bf16(v);
            else m[i * I + j] = v;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < out_blocks; b++) {
            const int64_t n0 = b * ROWS, rows = H - n0 < ROWS ? H - n0 : ROWS;
            float y[ROWS];
            float sum[ROWS] = {0};
            for (int i = 0; i < count; i++) {
                const void *mi = split ? (const void *)(m + i * 2 * halfI)
                                       : is_bf16 ? (const void *)((const uint16_t *)m + i * I) : (const void *)(m + i * I);
                rows_block(isa, is_bf16, W_out[i], mi, m + i * 2 * halfI, m + i * 2 * halfI + halfI, y, n0, rows, I, 1);
                for (int64_t r = 0; r < rows; r++) sum[r] += weights[i] * (is_bf16 ? round_bf16(y[r]) : y[r]);
            }
            for (int64_t r = 0; r < rows; r++) {  /* the weighted sum is fp32; the layer's output has x's dtype */
                if (is_bf16) ((uint16_t *)out)[n0 + r] = f32_to_bf16(sum[r]);
                else ((float *)out)[n0 + r] = sum[r];
            }
        }
    }
}
