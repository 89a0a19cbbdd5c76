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
#include <omp.h>

#include "bf16.h"
#include "block_bf16_avx512.h"
#include "block_f32.h"
#include "hsum.h"
#include "silu_gate.h"
#include "stream_access.h"  /* PREFETCH_BYTES, STREAMS: the AVX2 paths' reads */

#define MAXT 64
#define ROWS 4 /* rows per work item: four accumulator chains hide the FMA latency */
#define ISA_AVX2 1
#define ISA_AVX512 2

int gemv_max_tokens(void) { return MAXT; }

/* ---- AVX-512 ---------------------------------------------------------------------------------- */

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
 * per thread, which the hardware prefetcher follows (interleaving several adjacent short rows splits it
 * into short streams and, measured at K = 1024, halves the rate). Used for two or more tokens; one token
 * goes through stream_rows.
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

__attribute__((target("avx2,fma")))
static void rows_bf16_avx2(const uint16_t *W, const float *xe, const float *xo, float *y, int64_t n0, int64_t rows,
                           int64_t N, int64_t K, int64_t T) {
    const int64_t half = (K + 1) / 2;
    for (int64_t r = 0; r < rows; r++) {
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

/* fp32: the same row-at-a-time stream, eight weights per FMA. */
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

__attribute__((target("avx2,fma")))
static void rows_f32_avx2(const float *W, const float *x, float *y, int64_t n0, int64_t rows, int64_t N, int64_t K,
                          int64_t T) {
    for (int64_t r = 0; r < rows; r++) {
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

/* ---- one token: a thread's rows as far-apart streams (both instruction sets) -------------------
 * At one token a thread's time is the time its core takes to stream its share of the weights, and one
 * sequential stream per core leaves DRAM bandwidth unused: on two AMD EPYC vCPUs a plain read of 44 MB
 * took 15-17 GB/s as one stream per thread and 23-25 GB/s as four far-apart streams per thread. So a
 * thread's contiguous share of the rows is cut into STREAMS segments, and it reads one row of each segment
 * at a time, each segment front to back. (Adjacent short rows read together are not that: four 2 KB rows
 * side by side are one stream broken into short pieces, and fell from 0.85 to 0.6 of a plain read.)
 * Each row's dot product is one row's arithmetic, whatever rows it is read with: bf16 sums even and odd
 * elements in two accumulators, 16 weights a step; fp32 one accumulator, 8 weights a step. */

/* The rows of `count` matrices [N, K] (row j of the set: matrix j / N, its row j % N), each matrix against
 * its own input x[i]: fp32 [K] for fp32 weights; for bf16 weights on AVX2 the even elements as fp32, the odd
 * ones in xo[i], and on AVX-512 the bf16 row itself (the AVX512-BF16 dot products take bf16 pairs). */
typedef struct {
    int is_bf16, out_bf16;  /* weights bf16; outputs rounded to bf16 (else fp32) */
    int64_t count, N, K;
    const void *const *W;
    const void *const *x;
    const float *const *xo;
    void *const *y;  /* [N] per matrix */
} RowSet;

/* Row j of a set: its matrix j / N and its row there, divided once per step and shared by the dot products
 * and the store of their sums. */
typedef struct {
    int64_t matrix, row;
} SetRow;

__attribute__((target("avx2,fma"), always_inline))
static inline void dots_bf16_avx2(const RowSet *set, const SetRow *at, float *sums, const int n) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    const int64_t K = set->K, K16 = K & ~(int64_t)15;
    const uint16_t *w[STREAMS];
    const float *xe[STREAMS], *xo[STREAMS];
    __m256 ae[STREAMS], ao[STREAMS];
    for (int r = 0; r < n; r++) {
        w[r] = (const uint16_t *)set->W[at[r].matrix] + at[r].row * K;
        xe[r] = (const float *)set->x[at[r].matrix];
        xo[r] = set->xo[at[r].matrix];
        ae[r] = ao[r] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < K16; k += 16)
        for (int r = 0; r < n; r++) {
            _mm_prefetch((const char *)(w[r] + k) + PREFETCH_BYTES, _MM_HINT_NTA);
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w[r] + k));
            ae[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(wv, 16)), _mm256_loadu_ps(xe[r] + k / 2), ae[r]);
            ao[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(wv, high)), _mm256_loadu_ps(xo[r] + k / 2), ao[r]);
        }
    for (int r = 0; r < n; r++) {
        float s = hsum256(_mm256_add_ps(ae[r], ao[r]));
        for (int64_t j = K16; j < K; j++) s += bf16_to_f32(w[r][j]) * ((j & 1) ? xo[r][j / 2] : xe[r][j / 2]);
        sums[r] = s;
    }
}

__attribute__((target("avx2,fma"), always_inline))
static inline void dots_f32_avx2(const RowSet *set, const SetRow *at, float *sums, const int n) {
    const int64_t K = set->K, K8 = K & ~(int64_t)7;
    const float *w[STREAMS], *x[STREAMS];
    __m256 a[STREAMS];
    for (int r = 0; r < n; r++) {
        w[r] = (const float *)set->W[at[r].matrix] + at[r].row * K;
        x[r] = (const float *)set->x[at[r].matrix];
        a[r] = _mm256_setzero_ps();
    }
    for (int64_t k = 0; k < K8; k += 8)
        for (int r = 0; r < n; r++) {
            _mm_prefetch((const char *)(w[r] + k) + PREFETCH_BYTES, _MM_HINT_NTA);
            a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w[r] + k), _mm256_loadu_ps(x[r] + k), a[r]);
        }
    for (int r = 0; r < n; r++) {
        float s = hsum256(a[r]);
        for (int64_t j = K8; j < K; j++) s += w[r][j] * x[r][j];
        sums[r] = s;
    }
}

/* AVX-512: the same streams, one 64-byte line of each row a step (32 bf16 weights, one AVX512-BF16 dot
 * product of pairs, or 16 fp32 weights, one FMA), without the software prefetch: on the AMD Zen 4 VM the
 * hardware prefetchers follow the four streams, and the NTA prefetch lowered moe_token from 0.87-0.95 to
 * 0.72-0.94 of a plain read (bench/diagnostics/kernel_ab, 6 alternating runs, docs/benchmarks.md). */
__attribute__((target("avx512f,avx512bf16"), always_inline))
static inline void dots_bf16_avx512(const RowSet *set, const SetRow *at, float *sums, const int n) {
    const int64_t K = set->K, K32 = K & ~(int64_t)31;
    const uint16_t *w[STREAMS], *x[STREAMS];
    __m512 a[STREAMS];
    for (int r = 0; r < n; r++) {
        w[r] = (const uint16_t *)set->W[at[r].matrix] + at[r].row * K;
        x[r] = (const uint16_t *)set->x[at[r].matrix];
        a[r] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K32; k += 32)
        for (int r = 0; r < n; r++) {
            a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_loadu_si512((const void *)(w[r] + k)),
                                    (__m512bh)_mm512_loadu_si512((const void *)(x[r] + k)));
        }
    for (int r = 0; r < n; r++) {
        float s = _mm512_reduce_add_ps(a[r]);
        for (int64_t j = K32; j < K; j++) s += bf16_to_f32(w[r][j]) * bf16_to_f32(x[r][j]);
        sums[r] = s;
    }
}

__attribute__((target("avx512f"), always_inline))
static inline void dots_f32_avx512(const RowSet *set, const SetRow *at, float *sums, const int n) {
    const int64_t K = set->K, K16 = K & ~(int64_t)15;
    const float *w[STREAMS], *x[STREAMS];
    __m512 a[STREAMS];
    for (int r = 0; r < n; r++) {
        w[r] = (const float *)set->W[at[r].matrix] + at[r].row * K;
        x[r] = (const float *)set->x[at[r].matrix];
        a[r] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < K16; k += 16)
        for (int r = 0; r < n; r++) {
            a[r] = _mm512_fmadd_ps(_mm512_loadu_ps(w[r] + k), _mm512_loadu_ps(x[r] + k), a[r]);
        }
    for (int r = 0; r < n; r++) {
        float s = _mm512_reduce_add_ps(a[r]);
        for (int64_t j = K16; j < K; j++) s += w[r][j] * x[r][j];
        sums[r] = s;
    }
}

/* The n rows of one step of the streams into sums, per instruction set; a constant row count keeps the
 * accumulators in registers. */
typedef void (*StepDots)(const RowSet *set, const SetRow *at, float *sums, int n);

__attribute__((target("avx2,fma")))
static void step_dots_avx2(const RowSet *set, const SetRow *at, float *sums, int n) {
    if (n == STREAMS) {
        if (set->is_bf16) dots_bf16_avx2(set, at, sums, STREAMS);
        else dots_f32_avx2(set, at, sums, STREAMS);
        return;
    }
    for (int r = 0; r < n; r++) {
        if (set->is_bf16) dots_bf16_avx2(set, at + r, sums + r, 1);
        else dots_f32_avx2(set, at + r, sums + r, 1);
    }
}

__attribute__((target("avx512f,avx512bf16")))
static void step_dots_avx512(const RowSet *set, const SetRow *at, float *sums, int n) {
    if (n == STREAMS) {
        if (set->is_bf16) dots_bf16_avx512(set, at, sums, STREAMS);
        else dots_f32_avx512(set, at, sums, STREAMS);
        return;
    }
    for (int r = 0; r < n; r++) {
        if (set->is_bf16) dots_bf16_avx512(set, at + r, sums + r, 1);
        else dots_f32_avx512(set, at + r, sums + r, 1);
    }
}

/* The calling thread's share of `set`, inside a parallel region: contiguous rows, read as STREAMS streams. */
static void stream_rows(const RowSet *set, int isa) {
    const StepDots dots = isa == ISA_AVX512 ? step_dots_avx512 : step_dots_avx2;
    const StreamShare share = stream_share(set->count * set->N, omp_get_num_threads(), omp_get_thread_num());
    for (int64_t step = 0; step < share.segment; step++) {
        int64_t rows[STREAMS];
        SetRow at[STREAMS];
        float sums[STREAMS];
        const int n = stream_rows_at(&share, step, rows);
        for (int r = 0; r < n; r++) at[r] = (SetRow){rows[r] / set->N, rows[r] % set->N};
        dots(set, at, sums, n);
        for (int r = 0; r < n; r++) {
            if (set->out_bf16) ((uint16_t *)set->y[at[r].matrix])[at[r].row] = f32_to_bf16(sums[r]);
            else ((float *)set->y[at[r].matrix])[at[r].row] = sums[r];
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
    if (isa == ISA_AVX512) {  /* fp32: bf16 goes through block_bf16_tokens_avx512 */
        rows_f32_avx512((const float *)W + n0 * K, (const float *)x, y, 0, rows, rows, K, T);
    } else if (is_bf16) {
        rows_bf16_avx2((const uint16_t *)W + n0 * K, xe, xo, y, 0, rows, rows, K, T);
    } else {
        rows_f32_avx2((const float *)W + n0 * K, (const float *)x, y, 0, rows, rows, K, T);
    }
}

/* AVX2 from BLOCK_TOKENS tokens: four rows against two tokens at a time over chunks of the inputs, so that
 * the rows' chunk and the two tokens' stay in L1 (rows_* re-read four tokens' inputs from L2 for each row:
 * half the FMA rate once they outgrow L1; measured in docs/benchmarks.md). fp32 rows go through block_f32.h;
 * bf16 rows are widened in registers as row_bf16_avx2 does, against the split inputs. */
#define BLOCK_TOKENS 8

/* R bf16 rows (row r at w + r * K) against TT tokens (split inputs: token t's even elements at xe + t * half,
 * odd ones at xo + t * half) over inputs [k0, k1), a multiple of 16; each sum added to out[t * R + r]. */
__attribute__((target("avx2,fma"), always_inline))
static inline void block_bf16_tile(const uint16_t *w, const float *xe, const float *xo, int64_t half, float *out,
                                   int64_t K, int64_t k0, int64_t k1, const int R, const int TT) {
    const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 a[4][2];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < TT; t++) a[r][t] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k1; k += 16) {
        __m256 ve[2], vo[2];
        for (int t = 0; t < TT; t++) {
            ve[t] = _mm256_loadu_ps(xe + t * half + k / 2);
            vo[t] = _mm256_loadu_ps(xo + t * half + k / 2);
        }
        for (int r = 0; r < R; r++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + r * K + k));
            const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
            const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wv, high));
            for (int t = 0; t < TT; t++) a[r][t] = _mm256_fmadd_ps(wo, vo[t], _mm256_fmadd_ps(we, ve[t], a[r][t]));
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < TT; t++) out[t * R + r] += hsum256(a[r][t]);
}

#define BLOCK_BF16_TILE(R_)                                                                                      \
    do {                                                                                                         \
        if (T - t >= 2) block_bf16_tile(w, xe + t * half, xo + t * half, half, out + t * R_, K, k0, k1, R_, 2);  \
        else block_bf16_tile(w, xe + t * half, xo + t * half, half, out + t * R_, K, k0, k1, R_, 1);             \
    } while (0)

/* bf16 rows w [R, K] (R <= 4) against T tokens (split inputs, as rows_bf16_avx2 takes them): out [T, R]. */
__attribute__((target("avx2,fma")))
static void block_bf16_tokens(const uint16_t *w, int R, const float *xe, const float *xo, float *out, int64_t K,
                              int64_t T) {
    const int64_t half = (K + 1) / 2, K16 = K & ~(int64_t)15;
    for (int64_t t = 0; t < T; t++)
        for (int r = 0; r < R; r++) {
            float s = 0.0f;
            for (int64_t j = K16; j < K; j++)
                s += bf16_to_f32(w[r * K + j]) * ((j & 1) ? xo[t * half + j / 2] : xe[t * half + j / 2]);
            out[t * R + r] = s;
        }
    for (int64_t k0 = 0; k0 < K16; k0 += ROWS_CHUNK) {
        const int64_t k1 = K16 - k0 < ROWS_CHUNK ? K16 : k0 + ROWS_CHUNK;
        for (int64_t t = 0; t < T; t += 2) switch (R) {
                case 1: BLOCK_BF16_TILE(1); break;
                case 2: BLOCK_BF16_TILE(2); break;
                case 3: BLOCK_BF16_TILE(3); break;
                default: BLOCK_BF16_TILE(4); break;
            }
    }
}

/* For each of `count` experts i: y[i] = x[i] @ W[i]^T, with T[i] tokens (<= MAXT), stored as fp32 or, with
 * out_bf16, rounded to bf16 as torch's bf16 matmul output is. For T > 1 the weight rows are read once
 * per token but stay in L1 between tokens (rows_*: up to four tokens per pass over a row; on AVX2 from
 * BLOCK_TOKENS tokens four rows and two tokens at a time, block_*_tokens).
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
    if (tmax == 1) {
        const void *xs[count];
        const float *xo[count];
        for (int i = 0; i < count; i++) {
            xs[i] = split ? scratch + 2 * i * stride : x[i];
            xo[i] = split ? scratch + (2 * i + 1) * stride : NULL;
        }
        const RowSet set = {is_bf16, out_bf16, count, N, K, W, xs, xo, y};
#pragma omp parallel num_threads(threads)
        stream_rows(&set, isa);
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < (int64_t)count * blocks; item++) {
        const int i = (int)(item / blocks);
        const int64_t n0 = (item % blocks) * ROWS;
        const int64_t rows = N - n0 < ROWS ? N - n0 : ROWS;
        float tmp[MAXT * ROWS];  /* [T, rows] */
        if (isa == ISA_AVX512 && is_bf16)
            block_bf16_tokens_avx512((const uint16_t *)W[i] + n0 * K, (int)rows, (const uint16_t *)x[i], tmp, K, T[i]);
        else if (isa == ISA_AVX2 && T[i] >= BLOCK_TOKENS && is_bf16)
            block_bf16_tokens((const uint16_t *)W[i] + n0 * K, (int)rows, scratch + 2 * i * stride,
                              scratch + (2 * i + 1) * stride, tmp, K, T[i]);
        else if (isa == ISA_AVX2 && T[i] >= BLOCK_TOKENS)
            block_f32_tokens((const float *)W[i] + n0 * K, (int)rows, (const float *)x[i], tmp, K, T[i]);
        else
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
 * one parallel region of four work-shared steps: the input projections of all the experts as one set of
 * rows read as far-apart streams (stream_rows), the gate, the output projections likewise into per-expert
 * sums, then their weighted sum: a layer's misses cost one thread wake-up and no Python between the
 * steps. The caller checks that the module's gate is this one (runtime/cpu_executor.py).
 * out [H] has x's dtype (the fp32 sum rounded once, as the reference's output is); scratch holds
 * count * (4I + 2 + H) floats: h [count][2I], the gate output as the output projections read it
 * ([count][I (+1)]: AVX2 bf16 split into even and odd halves as fp32, AVX-512 bf16 as bf16, fp32 as it is),
 * per-expert outputs [count][H]. */
void moe_token(int isa, int is_bf16, int count, const void **W_in, const void **W_out, const void *x,
               const float *weights, void *out, int64_t H, int64_t I, int threads, float *scratch) {
    const int split = isa == ISA_AVX2 && is_bf16;
    const int64_t halfH = (H + 1) / 2, halfI = (I + 1) / 2, m_stride = split ? 2 * halfI : I;
    float *h = scratch, *m = scratch + (int64_t)count * 2 * I, *y = m + (int64_t)count * m_stride;
    float xs[2 * halfH > 0 ? 2 * halfH : 1];  /* AVX2 bf16: x split into even and odd elements */
    if (split) split_bf16((const uint16_t *)x, xs, xs + halfH, H, 1);
    const void *x_in[count], *m_in[count];
    const float *xo_in[count], *mo_in[count];
    void *h_out[count], *y_out[count];
    for (int i = 0; i < count; i++) {
        x_in[i] = split ? (const void *)xs : x;
        xo_in[i] = split ? xs + halfH : NULL;
        m_in[i] = split || !is_bf16 ? (const void *)(m + i * m_stride) : (const void *)((uint16_t *)m + i * I);
        mo_in[i] = split ? m + i * m_stride + halfI : NULL;
        h_out[i] = h + i * 2 * I;
        y_out[i] = y + i * H;
    }
    const RowSet in = {is_bf16, 0, count, 2 * I, H, W_in, x_in, xo_in, h_out};
    const RowSet down = {is_bf16, 0, count, H, I, W_out, m_in, mo_in, y_out};
#pragma omp parallel num_threads(threads)
    {
        stream_rows(&in, isa);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t item = 0; item < (int64_t)count * I; item++) {
            const int64_t i = item / I, j = item % I;
            const float v = silu_times(h[i * 2 * I + j], h[i * 2 * I + I + j], is_bf16);
            if (split) m[i * m_stride + (j & 1) * halfI + j / 2] = v;  /* split for the down projection */
            else if (is_bf16) ((uint16_t *)m)[i * I + j] = f32_to_bf16(v);
            else m[i * I + j] = v;
        }
        stream_rows(&down, isa);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t n = 0; n < H; n++) {  /* the weighted sum is fp32; the layer's output has x's dtype */
            float sum = 0.0f;
            for (int i = 0; i < count; i++) sum += weights[i] * (is_bf16 ? round_bf16(y[i * H + n]) : y[i * H + n]);
            if (is_bf16) ((uint16_t *)out)[n] = f32_to_bf16(sum);
            else ((float *)out)[n] = sum;
        }
    }
}
