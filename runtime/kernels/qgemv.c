/* Matrix-vector products for int8 and int4 experts (the layout of runtime/contracts/expert_format.py:
 * qweight int8 [N, K] or uint8 [N, K/2] with input 2j in the low nibble of byte j and 2j+1 in its high
 * nibble, as code q + 8; float16 scales [N, K/G], w[n, k] = float(scale[n, k / G]) * q[n, k]).
 *
 * Numerics: each weight is dequantized in registers to exactly the reference's weight (float(scale) * q,
 * rounded to bf16 for a bf16 model, dequant.h) and multiplied by the fp32 input with fp32 sums, so the
 * kernel differs from "dequantize, then torch's matmul" only in the order of its fp32 additions, as the
 * bf16 kernel of gemv.c does (bench/results/cpu_kernel_int_avx2.md has the measurements that chose this
 * over integer dot products with the input quantized to 8 bits, llama.cpp's Q8 way). Where a group's
 * scale makes every float(scale) * q a bf16 already (int8: a power of two; int4: at most 5 significant
 * bits, as runtime/quant_format.py's rule stores them), the scale comes out of the group's sum instead:
 * the same weights at a fraction of the per-weight work (dequant.h), chosen eight groups at a time; one
 * token's int4 groups of 32 are then summed with integer multiply-adds against the input held as 22-bit
 * fixed point per group (q4planes.h), within the same summation-order tolerance.
 *
 * The work is laid out as in gemv.c: one token reads each thread's rows as STREAMS far-apart streams
 * (stream_access.h), a few tokens use each dequantized row for up to four tokens while it is in registers,
 * more tokens (int4 from 5, int8 from 32; both from 2 into bf16 for a bf16 model on a CPU with AVX512-BF16,
 * multiplied by block_bf16_avx512.h) dequantize a block of four rows once into fp32 and multiply it
 * by block_f32.h's L1-blocked product, and one decode token's experts run fused (qmoe_token). AVX2 + FMA + F16C; qgemv_vnni.c
 * builds the same code again with AVX512-VNNI, which one token's factored int4 pairs use (q4planes.h).
 * Inputs are first widened to fp32 into scratch, one row of K floats per token: for int4 split into the
 * K/2 even elements then the K/2 odd ones (the low and high nibbles of the weights' bytes), or permuted in
 * blocks of 32 for the table path, which one token's rows follow with their byte planes (q4planes.h).
 */
#include <immintrin.h>
#include <stdint.h>
#include <omp.h>

#include "bf16.h"
#include "dequant.h"
#include "hsum.h"
#include "q4planes.h"
#include "block_bf16_avx512.h"
#include "block_f32.h"
#include "silu_gate.h"
#include "stream_access.h" /* PREFETCH_BYTES, STREAMS */

#define QMAXT 64    /* tokens per call, as gemv.c's MAXT */
#define QROWS 4     /* rows per work item at two or more tokens */
/* From this many tokens a block of rows is dequantized once (dequant_row) and multiplied as fp32 (block_f32.h),
 * measured with bench/diagnostics/int_kernel_ab.py --tokens (docs/benchmarks.md): int4's table lookups
 * cost more than one pass of four tokens' FMAs, int8's widening far less. */
#define DEQUANT_ROW_TOKENS_INT4 5
#define DEQUANT_ROW_TOKENS_INT8 32
/* A bf16 model on a CPU with AVX512-BF16: from this many tokens a block of rows is dequantized once into bf16
 * and multiplied by block_bf16_avx512.h, both formats. Against the per-row path at 2-4 tokens on AMD Zen 4
 * (bench/diagnostics/int_kernel_ab.py --tokens 2,3,4, two runs): int4 1.05-1.20x at 2 tokens, 1.13-1.35x at
 * 3-4; int8 0.97-1.03x at 2, 1.06-1.33x at 3-4 (docs/benchmarks.md). */
#define BF16_ROW_TOKENS 2
#define FMT_INT8 1  /* as runtime/kernels/__init__.py */
#define FMT_INT4 2

/* qgemv_vnni.c includes this file with QGEMV_VNNI set: its two entry points are named with _vnni, and the
 * table and the size queries are this file's (one definition in the library). */
#ifdef QGEMV_VNNI
#define QEXPORT(name) name##_vnni
#else
#define QEXPORT(name) name

int qgemv_max_tokens(void) { return QMAXT; }

uint8_t q4_bf16_tables[1024][64] __attribute__((aligned(64)));

/* bf16(m * (code - 8)) for each float16 mantissa m in [1, 2) (dequant.h), built when the library loads. */
__attribute__((constructor)) static void build_q4_bf16_tables(void) {
    for (int i = 0; i < 1024; i++)
        for (int c = 0; c < 16; c++) {
            const uint16_t t = f32_to_bf16((1.0f + (float)i / 1024.0f) * (float)(c - 8)); /* the product is exact */
            q4_bf16_tables[i][c] = q4_bf16_tables[i][16 + c] = (uint8_t)(t & 0xFF);
            q4_bf16_tables[i][32 + c] = q4_bf16_tables[i][48 + c] = (uint8_t)(t >> 8);
        }
}
#endif

/* How a path wants its fp32 inputs: as they are (int8), even elements then odd (int4, dequant_i4), or
 * permuted within blocks of 32 (int4 of a bf16 model with groups of a multiple of 32, q4tab_block). */
enum { LAYOUT_PLAIN, LAYOUT_EVEN_ODD, LAYOUT_TABLE };

static int input_layout(int fmt, int to_bf16, int64_t G) {
    if (fmt == FMT_INT8) return LAYOUT_PLAIN;
    return to_bf16 && G % 32 == 0 ? LAYOUT_TABLE : LAYOUT_EVEN_ODD;
}

static inline int64_t input_slot(int layout, int64_t K, int64_t k) {
    if (layout == LAYOUT_EVEN_ODD) return (k & 1) * (K / 2) + k / 2;
    if (layout == LAYOUT_TABLE) return (k & ~(int64_t)31) + q4tab_slot((int)(k & 31));
    return k;
}

/* The rows of `count` matrices [N, K] (row j of the set: matrix j / N, its row j % N), each matrix against
 * its own prepared fp32 input x[i] (K floats; int4: even elements, then odd). */
typedef struct {
    int fmt, to_bf16, out_bf16; /* to_bf16: a bf16 model (weights rounded as the reference's are) */
    int layout;                 /* input_layout(fmt, to_bf16, G): which path reads the rows */
    int planes;                 /* LAYOUT_TABLE, G 32, one token: x[i] + K holds the input as q4planes.h lays it out */
    int64_t count, N, K, G;
    const void *const *W;      /* qweight of each matrix */
    const uint16_t *const *S;  /* float16 scales of each matrix, [N, K/G] */
    const float *const *x;
    void *const *y;            /* [N] per matrix, fp32 or bf16 */
} QRowSet;

AVX2_INLINE float hsum128(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- one token: n rows read side by side (far-apart streams), one dot product each ------------------ */

/* G: set->G, passed as the constant 32 for the default group size so that a group's loop unrolls. */
AVX2_INLINE void qdots_i8(const QRowSet *set, const int64_t *rows, float *sums, const int n, const int rb,
                          const int64_t G) {
    const int64_t K = set->K, groups = K / G;
    const int8_t *w[STREAMS];
    const uint16_t *sc[STREAMS];
    const float *x[STREAMS];
    __m256 a[STREAMS];
    for (int r = 0; r < n; r++) {
        const int64_t i = rows[r] / set->N, row = rows[r] % set->N;
        w[r] = (const int8_t *)set->W[i] + row * K;
        sc[r] = set->S[i] + row * groups;
        x[r] = set->x[i];
        a[r] = _mm256_setzero_ps();
    }
    for (int64_t g0 = 0; g0 < groups; g0 += 8) { /* eight groups' scales at a time */
        const int64_t gn = groups - g0 < 8 ? groups - g0 : 8;
        float s[STREAMS][8];
        for (int r = 0; r < n; r++) {
            if (!(g0 & 31)) _mm_prefetch((const char *)(sc[r] + g0) + PREFETCH_BYTES / 8, _MM_HINT_NTA);
            _mm256_storeu_ps(s[r], load_scales8(sc[r] + g0, gn));
        }
        int factored = 1; /* dequant.h: the scales of these groups come out of the sums exactly */
        for (int r = 0; r < n && rb && factored; r++) factored = scales_factor_exactly(_mm256_loadu_ps(s[r]));
        for (int64_t gi = 0; gi < gn; gi++) {
            __m256 sv[STREAMS];
            for (int r = 0; r < n; r++) sv[r] = _mm256_broadcast_ss(&s[r][gi]);
            if (factored) {
                __m256 t[STREAMS];
                for (int r = 0; r < n; r++) t[r] = _mm256_setzero_ps();
                for (int64_t k = (g0 + gi) * G; k < (g0 + gi + 1) * G; k += 8)
                    for (int r = 0; r < n; r++) {
                        if (!(k & 63)) _mm_prefetch((const char *)(w[r] + k) + PREFETCH_BYTES, _MM_HINT_NTA);
                        t[r] = _mm256_fmadd_ps(codes_i8(w[r] + k), _mm256_loadu_ps(x[r] + k), t[r]);
                    }
                for (int r = 0; r < n; r++) a[r] = _mm256_fmadd_ps(t[r], sv[r], a[r]);
                continue;
            }
            for (int64_t k = (g0 + gi) * G; k < (g0 + gi + 1) * G; k += 8)
                for (int r = 0; r < n; r++) {
                    if (!(k & 63)) _mm_prefetch((const char *)(w[r] + k) + PREFETCH_BYTES, _MM_HINT_NTA);
                    a[r] = _mm256_fmadd_ps(dequant_i8(w[r] + k, sv[r], rb), _mm256_loadu_ps(x[r] + k), a[r]);
                }
        }
    }
    for (int r = 0; r < n; r++) sums[r] = hsum256(a[r]);
}

/* wide: G a multiple of 16, so that sixteen inputs (eight bytes) share a scale; else eight at a time. */
AVX2_INLINE void qdots_i4(const QRowSet *set, const int64_t *rows, float *sums, const int n, const int rb,
                          const int wide) {
    const int64_t K = set->K, half = K / 2, groups = K / set->G, group_bytes = set->G / 2;
    const uint8_t *w[STREAMS];
    const uint16_t *sc[STREAMS];
    const float *xe[STREAMS], *xo[STREAMS];
    __m256 ae[STREAMS], ao[STREAMS];
    __m128 be[STREAMS], bo[STREAMS];
    for (int r = 0; r < n; r++) {
        const int64_t i = rows[r] / set->N, row = rows[r] % set->N;
        w[r] = (const uint8_t *)set->W[i] + row * half;
        sc[r] = set->S[i] + row * groups;
        xe[r] = set->x[i];
        xo[r] = set->x[i] + half;
        ae[r] = ao[r] = _mm256_setzero_ps();
        be[r] = bo[r] = _mm_setzero_ps();
    }
    for (int64_t g = 0; g < groups; g++) {
        const int64_t j0 = g * group_bytes; /* byte j holds inputs 2j and 2j + 1: xe[j] and xo[j] */
        if (wide) {
            __m256 s[STREAMS], m8[STREAMS];
            for (int r = 0; r < n; r++) {
                if (!(g & 31)) _mm_prefetch((const char *)(sc[r] + g) + PREFETCH_BYTES / 8, _MM_HINT_NTA);
                s[r] = _mm256_set1_ps(_cvtsh_ss(sc[r][g]));
                m8[r] = _mm256_mul_ps(s[r], _mm256_set1_ps(-8.0f));
            }
            for (int64_t j = j0; j < j0 + group_bytes; j += 8)
                for (int r = 0; r < n; r++) {
                    if (!(j & 63)) _mm_prefetch((const char *)(w[r] + j) + PREFETCH_BYTES, _MM_HINT_NTA);
                    __m256 e, o;
                    dequant_i4(w[r] + j, s[r], m8[r], &e, &o, rb);
                    ae[r] = _mm256_fmadd_ps(e, _mm256_loadu_ps(xe[r] + j), ae[r]);
                    ao[r] = _mm256_fmadd_ps(o, _mm256_loadu_ps(xo[r] + j), ao[r]);
                }
        } else {
            for (int r = 0; r < n; r++) {
                const __m128 s = _mm_set1_ps(_cvtsh_ss(sc[r][g])), m8 = _mm_mul_ps(s, _mm_set1_ps(-8.0f));
                for (int64_t j = j0; j < j0 + group_bytes; j += 4) {
                    __m128 e, o;
                    dequant_i4_half(w[r] + j, s, m8, &e, &o, rb);
                    be[r] = _mm_fmadd_ps(e, _mm_loadu_ps(xe[r] + j), be[r]);
                    bo[r] = _mm_fmadd_ps(o, _mm_loadu_ps(xo[r] + j), bo[r]);
                }
            }
        }
    }
    for (int r = 0; r < n; r++) sums[r] = hsum256(_mm256_add_ps(ae[r], ao[r])) + hsum128(_mm_add_ps(be[r], bo[r]));
}

/* One pair of factored int4 groups (bytes j.. of each row, planes at byte `at`) for each of n rows, added into
 * a[r] times the pair's scales: lanes `idx` of sv[r]. */
AVX2_INLINE void q4p_pair_rows(const uint8_t *const *w, const int8_t *const *planes, const __m256 *sv, __m256 *a,
                               const int n, int64_t j, int64_t at, __m256i idx) {
    for (int r = 0; r < n; r++) {
        if (!(j & 63)) _mm_prefetch((const char *)(w[r] + j) + PREFETCH_BYTES, _MM_HINT_NTA);
        a[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q4p_pair(w[r] + j, planes[r] + at)), _mm256_permutevar8x32_ps(sv[r], idx),
                               a[r]);
    }
}

/* int4 of a bf16 model by table (dequant.h): per group, the unscaled sums of each row, then times the
 * group's sign * 2^e. */
AVX2_INLINE void qdots_q4tab(const QRowSet *set, const int64_t *rows, float *sums, const int n, const int64_t G) {
    const int64_t K = set->K, groups = K / G, group_bytes = G / 2;
    const uint8_t *w[STREAMS];
    const uint16_t *sc[STREAMS];
    const float *x[STREAMS], *pscale[STREAMS], *poffset[STREAMS];
    const int8_t *planes[STREAMS];
    __m256 a[STREAMS];
    for (int r = 0; r < n; r++) {
        const int64_t i = rows[r] / set->N, row = rows[r] % set->N;
        w[r] = (const uint8_t *)set->W[i] + row * (K / 2);
        sc[r] = set->S[i] + row * groups;
        x[r] = set->x[i];
        planes[r] = (const int8_t *)(x[r] + K);
        pscale[r] = q4p_scales(K, planes[r]);
        poffset[r] = pscale[r] + q4p_groups8(K);
        a[r] = _mm256_setzero_ps();
    }
    for (int64_t g0 = 0; g0 < groups; g0 += 8) { /* eight groups' scales at a time */
        const int64_t gn = groups - g0 < 8 ? groups - g0 : 8;
        int32_t offset[STREAMS][8];
        float mult[STREAMS][8];
        __m256 full[STREAMS];
        int factored = G == 32 && set->planes; /* dequant.h: every scale of these groups has <= 5 bits */
        for (int r = 0; r < n; r++) {
            if (!(g0 & 31)) _mm_prefetch((const char *)(sc[r] + g0) + PREFETCH_BYTES / 8, _MM_HINT_NTA);
            full[r] = load_scales8(sc[r] + g0, gn);
            factored = factored && scales_5_bits(full[r]);
        }
        if (factored) { /* q4planes.h: per pair of groups, integer sums scaled by scale * 2^-e_g */
            __m256 sv[STREAMS];
            for (int r = 0; r < n; r++) { /* the offsets come off the same sums: a's lanes are added at the end */
                sv[r] = _mm256_mul_ps(full[r], _mm256_loadu_ps(pscale[r] + g0));
                a[r] = _mm256_fnmadd_ps(full[r], _mm256_loadu_ps(poffset[r] + g0), a[r]);
            }
            if (gn == 8) { /* a constant count, so that each pair's lane pattern is a constant */
                for (int p = 0; p < 4; p++)
                    q4p_pair_rows(w, planes, sv, a, n, (g0 + 2 * p) * group_bytes, (g0 / 2 + p) * Q4P_PAIR_BYTES,
                                  _mm256_setr_epi32(2 * p, 2 * p, 2 * p, 2 * p, 2 * p + 1, 2 * p + 1, 2 * p + 1, 2 * p + 1));
                continue;
            }
            for (int64_t gi = 0; gi < gn; gi += 2) {
                const int64_t j = (g0 + gi) * group_bytes, at = ((g0 + gi) / 2) * Q4P_PAIR_BYTES;
                const int lane = (int)gi;
                if (gi + 1 < gn) {
                    q4p_pair_rows(w, planes, sv, a, n, j, at,
                                  _mm256_setr_epi32(lane, lane, lane, lane, lane + 1, lane + 1, lane + 1, lane + 1));
                } else { /* the row's last group, without a partner */
                    for (int r = 0; r < n; r++) {
                        const __m128 part = _mm_mul_ps(_mm_cvtepi32_ps(q4p_single(w[r] + j, planes[r] + at)),
                                                       _mm_set1_ps(((const float *)&sv[r])[gi]));
                        a[r] = _mm256_add_ps(a[r], _mm256_insertf128_ps(_mm256_setzero_ps(), part, 0));
                    }
                }
            }
            continue;
        }
        for (int r = 0; r < n; r++) q4_scales8(full[r], offset[r], mult[r]);
        for (int64_t gi = 0; gi < gn; gi++)
            for (int r = 0; r < n; r++) {
                const uint8_t *table = &q4_bf16_tables[0][0] + offset[r][gi];
                if (G == 32) {
                    const int64_t j = (g0 + gi) * group_bytes;
                    if (!(j & 63)) _mm_prefetch((const char *)(w[r] + j) + PREFETCH_BYTES, _MM_HINT_NTA);
                    a[r] = _mm256_fmadd_ps(q4tab_group32(w[r] + j, table, x[r] + 2 * j),
                                           _mm256_broadcast_ss(&mult[r][gi]), a[r]);
                    continue;
                }
                __m256 ge = _mm256_setzero_ps(), go = _mm256_setzero_ps();
                for (int64_t j = (g0 + gi) * group_bytes; j < (g0 + gi + 1) * group_bytes; j += 16) {
                    if (!(j & 63)) _mm_prefetch((const char *)(w[r] + j) + PREFETCH_BYTES, _MM_HINT_NTA);
                    q4tab_block(w[r] + j, table, x[r] + 2 * j, &ge, &go);
                }
                a[r] = _mm256_fmadd_ps(_mm256_add_ps(ge, go), _mm256_broadcast_ss(&mult[r][gi]), a[r]);
            }
    }
    for (int r = 0; r < n; r++) sums[r] = hsum256(a[r]);
}

/* One function per (format, rounding, width) with the row count a constant, so the accumulators stay in
 * registers. */
#define QDOTS_DISPATCH(name, N_)                                                                 \
    __attribute__((target(INT_TARGET))) static void name(const QRowSet *set, const int64_t *rows, \
                                                              float *sums) {                      \
        if (set->fmt == FMT_INT8) {                                                              \
            if (set->G == 32 && set->to_bf16) qdots_i8(set, rows, sums, N_, 1, 32);             \
            else if (set->G == 32) qdots_i8(set, rows, sums, N_, 0, 32);                         \
            else if (set->to_bf16) qdots_i8(set, rows, sums, N_, 1, set->G);                     \
            else qdots_i8(set, rows, sums, N_, 0, set->G);                                       \
        } else if (set->layout == LAYOUT_TABLE) {                                                \
            if (set->G == 32) qdots_q4tab(set, rows, sums, N_, 32);                              \
            else qdots_q4tab(set, rows, sums, N_, set->G);                                       \
        } else if (set->G % 16 == 0) {                                                           \
            if (set->to_bf16) qdots_i4(set, rows, sums, N_, 1, 1);                               \
            else qdots_i4(set, rows, sums, N_, 0, 1);                                            \
        } else {                                                                                 \
            if (set->to_bf16) qdots_i4(set, rows, sums, N_, 1, 0);                               \
            else qdots_i4(set, rows, sums, N_, 0, 0);                                            \
        }                                                                                        \
    }
QDOTS_DISPATCH(qdots_streams, STREAMS)
QDOTS_DISPATCH(qdots_single, 1)

/* The calling thread's share of `set`, inside a parallel region: contiguous rows, read as STREAMS streams
 * (as stream_rows in gemv.c). */
static void qstream_rows(const QRowSet *set) {
    const StreamShare share = stream_share(set->count * set->N, omp_get_num_threads(), omp_get_thread_num());
    for (int64_t step = 0; step < share.segment; step++) {
        int64_t rows[STREAMS];
        float sums[STREAMS];
        const int n = stream_rows_at(&share, step, rows);
        if (n == STREAMS) qdots_streams(set, rows, sums);
        else
            for (int r = 0; r < n; r++) qdots_single(set, rows + r, sums + r);
        for (int r = 0; r < n; r++) {
            const int64_t i = rows[r] / set->N, row = rows[r] % set->N;
            if (set->out_bf16) ((uint16_t *)set->y[i])[row] = f32_to_bf16(sums[r]);
            else ((float *)set->y[i])[row] = sums[r];
        }
    }
}

/* ---- two or more tokens: each dequantized weight vector used for up to four tokens ------------------ */

/* One row against T tokens (x: T prepared rows of K floats), out[t * out_stride]. */
AVX2_INLINE void qrow_i8(const int8_t *w, const uint16_t *sc, const float *x, float *out, int64_t out_stride,
                         int64_t K, int64_t G, const int T, const int rb) {
    __m256 a[4];
    for (int t = 0; t < T; t++) a[t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < K / G; g++) {
        const __m256 s = _mm256_set1_ps(_cvtsh_ss(sc[g]));
        if (!rb || scales_factor_exactly(s)) { /* dequant.h */
            __m256 part[4];
            for (int t = 0; t < T; t++) part[t] = _mm256_setzero_ps();
            for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
                const __m256 qv = codes_i8(w + k);
                for (int t = 0; t < T; t++) part[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(x + t * K + k), part[t]);
            }
            for (int t = 0; t < T; t++) a[t] = _mm256_fmadd_ps(part[t], s, a[t]);
            continue;
        }
        for (int64_t k = g * G; k < (g + 1) * G; k += 8) {
            const __m256 wv = dequant_i8(w + k, s, rb);
            for (int t = 0; t < T; t++) a[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * K + k), a[t]);
        }
    }
    for (int t = 0; t < T; t++) out[t * out_stride] = hsum256(a[t]);
}

AVX2_INLINE void qrow_i4(const uint8_t *w, const uint16_t *sc, const float *x, float *out, int64_t out_stride,
                         int64_t K, int64_t G, const int T, const int rb, const int wide) {
    const int64_t half = K / 2, group_bytes = G / 2;
    __m256 ae[4], ao[4];
    __m128 be[4], bo[4];
    for (int t = 0; t < T; t++) {
        ae[t] = ao[t] = _mm256_setzero_ps();
        be[t] = bo[t] = _mm_setzero_ps();
    }
    for (int64_t g = 0; g < K / G; g++) {
        const int64_t j0 = g * group_bytes;
        if (wide) {
            const __m256 s = _mm256_set1_ps(_cvtsh_ss(sc[g])), m8 = _mm256_mul_ps(s, _mm256_set1_ps(-8.0f));
            for (int64_t j = j0; j < j0 + group_bytes; j += 8) {
                __m256 e, o;
                dequant_i4(w + j, s, m8, &e, &o, rb);
                for (int t = 0; t < T; t++) {
                    ae[t] = _mm256_fmadd_ps(e, _mm256_loadu_ps(x + t * K + j), ae[t]);
                    ao[t] = _mm256_fmadd_ps(o, _mm256_loadu_ps(x + t * K + half + j), ao[t]);
                }
            }
        } else {
            const __m128 s = _mm_set1_ps(_cvtsh_ss(sc[g])), m8 = _mm_mul_ps(s, _mm_set1_ps(-8.0f));
            for (int64_t j = j0; j < j0 + group_bytes; j += 4) {
                __m128 e, o;
                dequant_i4_half(w + j, s, m8, &e, &o, rb);
                for (int t = 0; t < T; t++) {
                    be[t] = _mm_fmadd_ps(e, _mm_loadu_ps(x + t * K + j), be[t]);
                    bo[t] = _mm_fmadd_ps(o, _mm_loadu_ps(x + t * K + half + j), bo[t]);
                }
            }
        }
    }
    for (int t = 0; t < T; t++)
        out[t * out_stride] = hsum256(_mm256_add_ps(ae[t], ao[t])) + hsum128(_mm_add_ps(be[t], bo[t]));
}

AVX2_INLINE void qrow_q4tab(const uint8_t *w, const uint16_t *sc, const float *x, float *out, int64_t out_stride,
                            int64_t K, int64_t G, const int T) {
    const int64_t group_bytes = G / 2, groups = K / G;
    __m256 a[4];
    for (int t = 0; t < T; t++) a[t] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < groups; g0 += 8) {
        const int64_t gn = groups - g0 < 8 ? groups - g0 : 8;
        int32_t offset[8];
        float mult[8];
        q4_scales8(load_scales8(sc + g0, gn), offset, mult);
        for (int64_t gi = 0; gi < gn; gi++) {
            const uint8_t *table = &q4_bf16_tables[0][0] + offset[gi];
            __m256 ge[4], go[4];
            for (int t = 0; t < T; t++) ge[t] = go[t] = _mm256_setzero_ps();
            for (int64_t j = (g0 + gi) * group_bytes; j < (g0 + gi + 1) * group_bytes; j += 16)
                for (int t = 0; t < T; t++) q4tab_block(w + j, table, x + t * K + 2 * j, &ge[t], &go[t]);
            const __m256 m = _mm256_broadcast_ss(&mult[gi]);
            for (int t = 0; t < T; t++) a[t] = _mm256_fmadd_ps(_mm256_add_ps(ge[t], go[t]), m, a[t]);
        }
    }
    for (int t = 0; t < T; t++) out[t * out_stride] = hsum256(a[t]);
}

#define QROW_T(T_)                                                                                        \
    do {                                                                                                  \
        if (fmt == FMT_INT8) {                                                                            \
            if (rb) qrow_i8((const int8_t *)w, sc, x, out, out_stride, K, G, T_, 1);                      \
            else qrow_i8((const int8_t *)w, sc, x, out, out_stride, K, G, T_, 0);                         \
        } else if (layout == LAYOUT_TABLE) {                                                              \
            qrow_q4tab((const uint8_t *)w, sc, x, out, out_stride, K, G, T_);                             \
        } else if (G % 16 == 0) {                                                                         \
            if (rb) qrow_i4((const uint8_t *)w, sc, x, out, out_stride, K, G, T_, 1, 1);                  \
            else qrow_i4((const uint8_t *)w, sc, x, out, out_stride, K, G, T_, 0, 1);                     \
        } else {                                                                                          \
            if (rb) qrow_i4((const uint8_t *)w, sc, x, out, out_stride, K, G, T_, 1, 0);                  \
            else qrow_i4((const uint8_t *)w, sc, x, out, out_stride, K, G, T_, 0, 0);                     \
        }                                                                                                 \
    } while (0)

__attribute__((target(INT_TARGET)))
static void qrow(int fmt, int rb, int layout, const void *w, const uint16_t *sc, const float *x, float *out,
                 int64_t out_stride, int64_t K, int64_t G, int T) {
    switch (T) {
        case 1: QROW_T(1); break;
        case 2: QROW_T(2); break;
        case 3: QROW_T(3); break;
        default: QROW_T(4); break;
    }
}

/* ---- more than a few tokens: each row dequantized once, then multiplied as fp32 ----------------------
 * Row w's weights exactly as the reference's (float(scale) * q, rounded to bf16 for a bf16 model: the
 * helpers of dequant.h), into out[K] in the order the layout's prepared inputs are in, so that a plain fp32
 * product of the two rows is the row's product. qrow redoes the dequantization for each four tokens. */
__attribute__((target(INT_TARGET)))
static void dequant_row(int fmt, int rb, int layout, const void *w, const uint16_t *sc, float *out, int64_t K,
                        int64_t G) {
    if (fmt == FMT_INT8) {
        const int8_t *q = (const int8_t *)w;
        for (int64_t g = 0; g < K / G; g++) {
            const __m256 s = _mm256_set1_ps(_cvtsh_ss(sc[g]));
            const int round = rb && !scales_factor_exactly(s); /* s * q is a bf16 already where s is 2^e */
            for (int64_t k = g * G; k < (g + 1) * G; k += 8) _mm256_storeu_ps(out + k, dequant_i8(q + k, s, round));
        }
        return;
    }
    const uint8_t *q = (const uint8_t *)w;
    const int64_t group_bytes = G / 2, half = K / 2;
    if (layout == LAYOUT_TABLE) { /* as qrow_q4tab: the table's bf16(m * (code - 8)) times sign * 2^e, exact */
        for (int64_t g0 = 0; g0 < K / G; g0 += 8) {
            const int64_t gn = K / G - g0 < 8 ? K / G - g0 : 8;
            int32_t offset[8];
            float mult[8];
            q4_scales8(load_scales8(sc + g0, gn), offset, mult);
            for (int64_t gi = 0; gi < gn; gi++) {
                const uint8_t *table = &q4_bf16_tables[0][0] + offset[gi];
                const __m256 m = _mm256_broadcast_ss(&mult[gi]);
                for (int64_t j = (g0 + gi) * group_bytes; j < (g0 + gi + 1) * group_bytes; j += 16) {
                    __m256 v[4];
                    q4tab_weights(q + j, table, v);
                    for (int b = 0; b < 4; b++) _mm256_storeu_ps(out + 2 * j + 8 * b, _mm256_mul_ps(v[b], m));
                }
            }
        }
        return;
    }
    /* even inputs at j, odd ones at half + j (input_slot); eight weights a step fit every group size (a
     * multiple of 8), and the row is dequantized once for all its tokens */
    for (int64_t g = 0; g < K / G; g++) {
        const __m128 s = _mm_set1_ps(_cvtsh_ss(sc[g])), m8 = _mm_mul_ps(s, _mm_set1_ps(-8.0f));
        for (int64_t j = g * group_bytes; j < (g + 1) * group_bytes; j += 4) {
            __m128 e, o;
            dequant_i4_half(q + j, s, m8, &e, &o, rb);
            _mm_storeu_ps(out + j, e);
            _mm_storeu_ps(out + half + j, o);
        }
    }
}

/* ---- a bf16 model on a CPU with AVX512-BF16, from a few tokens: rows dequantized into bf16 -----------
 * Row w's weights exactly as the reference's (bf16(float(scale) * q), the same values dequant_row rounds to),
 * in input order, into out[K] as bf16, for block_bf16_avx512.h's product with the raw bf16 inputs: the same
 * products as the fp32 path (a bf16 times a bf16 is exact in fp32) at twice the multiply-adds per
 * instruction, and no prepared inputs. G a multiple of 32. */
__attribute__((target("avx512f,avx512bf16,f16c")))
static void dequant_row_bf16_avx512(int fmt, const void *w, const uint16_t *sc, uint16_t *out, int64_t K, int64_t G) {
    for (int64_t g = 0; g < K / G; g++) {
        const __m512 s = _mm512_set1_ps(_cvtsh_ss(sc[g])), minus8s = _mm512_mul_ps(s, _mm512_set1_ps(-8.0f));
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
            __m512 v[2]; /* inputs k .. k + 15 and k + 16 .. k + 31 */
            if (fmt == FMT_INT8) {
                const int8_t *q = (const int8_t *)w + k;
                for (int h = 0; h < 2; h++)
                    v[h] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16 * h)))), s);
            } else { /* byte j: input 2j in the low nibble, 2j + 1 in the high one, as code q + 8 */
                const __m128i b = _mm_loadu_si128((const __m128i *)((const uint8_t *)w + k / 2)), nib = _mm_set1_epi8(15);
                const __m128i lo = _mm_and_si128(b, nib), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nib);
                const __m128i codes[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
                for (int h = 0; h < 2; h++) /* code * s - 8 s: s * q exactly, as dequant_i4 */
                    v[h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(codes[h])), s, minus8s);
            }
            for (int h = 0; h < 2; h++) /* rounded to bf16 to nearest even, as torch's float -> bf16 */
                _mm256_storeu_si256((__m256i *)(out + k + 16 * h), (__m256i)_mm512_cvtneps_pbh(v[h]));
        }
    }
}

/* Whether one-token inputs of `layout` carry the planes of the factored int4 groups (q4planes.h), and how
 * many floats a prepared input row of K then takes. */
static inline int input_planes(int layout, int64_t G) { return layout == LAYOUT_TABLE && G == 32; }

static inline int64_t input_row_floats(int planes, int64_t K) { return K + (planes ? q4p_floats(K) : 0); }

#ifndef QGEMV_VNNI
/* Floats of scratch a one-token prepared input row of K takes at most (runtime/kernels/__init__.py sizes
 * the scratch with it). */
int64_t qgemv_row_floats(int64_t K) { return input_row_floats(1, K); }
#endif

/* Input k of a row of K at the slot its layout reads. */
static inline void place_input(int layout, float *xs, int64_t K, int64_t k, float v) { xs[input_slot(layout, K, k)] = v; }

/* An input row of K values (bf16 or fp32) as the kernels read it: fp32, placed as `layout` says, and with
 * `planes` the planes after them. */
static void prepare_input(int layout, int planes, int is_bf16, const void *x, float *xs, int64_t K) {
    float group[32];
    for (int64_t k = 0; k < K; k++) {
        const float v = is_bf16 ? bf16_to_f32(((const uint16_t *)x)[k]) : ((const float *)x)[k];
        place_input(layout, xs, K, k, v);
        if (planes) {
            group[k & 31] = v;
            if ((k & 31) == 31) q4p_prepare_group(group, k / 32, K, (int8_t *)(xs + K));
        }
    }
    if (planes) q4p_pad(K, (int8_t *)(xs + K));
}

/* For each of `count` matrices i (qweight W[i], scales S[i], all [N, K] with group size G): y[i] = x[i] @
 * dequantized(W[i])^T for T[i] <= QMAXT tokens; x[i] [T[i], K] in the model's dtype (bf16 when is_bf16,
 * else fp32); y[i] [T[i], N] fp32 or, with out_bf16, rounded to bf16 as torch's bf16 matmul output is.
 * bf16_block: the CPU has AVX512-BF16, so a bf16 model's rows (groups of a multiple of 32) from a few tokens
 * are dequantized into bf16 and multiplied by block_bf16_avx512.h. scratch holds count * max(T, 2) * K floats. */
void QEXPORT(qgemv_multi)(int fmt, int is_bf16, int count, const void **W, const uint16_t **S, const void **x, void **y,
                 const int64_t *T, int64_t N, int64_t K, int64_t G, int threads, float *scratch, int out_bf16,
                 int bf16_block) {
    int64_t tmax = 0;
    for (int i = 0; i < count; i++) tmax = T[i] > tmax ? T[i] : tmax;
    const size_t elem = is_bf16 ? 2 : 4;
    const int layout = input_layout(fmt, is_bf16, G), planes = tmax == 1 && input_planes(layout, G);
    const int64_t stride = tmax == 1 ? input_row_floats(planes, K) : tmax * K;
    const int bf16_rows = bf16_block && is_bf16 && G % 32 == 0; /* dequant_row_bf16_avx512's groups */
    for (int i = 0; i < count; i++) {
        if (bf16_rows && T[i] >= BF16_ROW_TOKENS) continue; /* those blocks multiply the raw bf16 inputs */
        for (int64_t t = 0; t < T[i]; t++)
            prepare_input(layout, planes, is_bf16, (const char *)x[i] + t * K * elem, scratch + i * stride + t * K, K);
    }
    if (tmax == 1) {
        const float *xs[count];
        for (int i = 0; i < count; i++) xs[i] = scratch + i * stride;
        const QRowSet set = {fmt, is_bf16, out_bf16, layout, planes, count, N, K, G, W, S, xs, y};
#pragma omp parallel num_threads(threads)
        qstream_rows(&set);
        return;
    }
    const int64_t blocks = (N + QROWS - 1) / QROWS, row_bytes = fmt == FMT_INT4 ? K / 2 : K;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < (int64_t)count * blocks; item++) {
        const int i = (int)(item / blocks);
        const int64_t n0 = (item % blocks) * QROWS, rows = N - n0 < QROWS ? N - n0 : QROWS;
        float tmp[QMAXT * QROWS]; /* [T, rows] */
        if (bf16_rows && T[i] >= BF16_ROW_TOKENS) { /* both formats: no per-token dequantization left */
            uint16_t block[QROWS * K];
            for (int64_t r = 0; r < rows; r++)
                dequant_row_bf16_avx512(fmt, (const char *)W[i] + (n0 + r) * row_bytes, S[i] + (n0 + r) * (K / G),
                                        block + r * K, K, G);
            block_bf16_tokens_avx512(block, (int)rows, (const uint16_t *)x[i], tmp, K, T[i]);
        } else if (T[i] >= (fmt == FMT_INT4 ? DEQUANT_ROW_TOKENS_INT4 : DEQUANT_ROW_TOKENS_INT8)) {
            float block[QROWS * K];
            for (int64_t r = 0; r < rows; r++)
                dequant_row(fmt, is_bf16, layout, (const char *)W[i] + (n0 + r) * row_bytes, S[i] + (n0 + r) * (K / G),
                            block + r * K, K, G);
            block_f32_tokens(block, (int)rows, scratch + i * stride, tmp, K, T[i]);
        } else
        for (int64_t r = 0; r < rows; r++) {
            const char *w = (const char *)W[i] + (n0 + r) * row_bytes;
            const uint16_t *sc = S[i] + (n0 + r) * (K / G);
            for (int64_t t = 0; t < T[i]; t += 4)
                qrow(fmt, is_bf16, layout, w, sc, scratch + i * stride + t * K, tmp + t * rows + r, rows, K, G,
                     (int)(T[i] - t < 4 ? T[i] - t : 4));
        }
        for (int64_t t = 0; t < T[i]; t++)
            for (int64_t r = 0; r < rows; r++) {
                if (out_bf16) ((uint16_t *)y[i])[t * N + n0 + r] = f32_to_bf16(tmp[t * rows + r]);
                else ((float *)y[i])[t * N + n0 + r] = tmp[t * rows + r];
            }
    }
}

/* ---- one decode token through a layer's int experts, fused (as moe_token in gemv.c) ----------------
 * For each expert i (W_in[i]/S_in[i] [2I, H] holding gate then up, W_out[i]/S_out[i] [H, I]):
 *   h = W_in[i] x;  m = silu(h[:I]) * h[I:];  out += w[i] * (W_out[i] m)
 * rounded to bf16 where the reference's bf16 ops round, in one parallel region. out [H] has x's dtype;
 * scratch holds qgemv_row_floats(H) + count * (2I + qgemv_row_floats(I) + H) floats. */
void QEXPORT(qmoe_token)(int fmt, int is_bf16, int count, const void **W_in, const uint16_t **S_in, const void **W_out,
                const uint16_t **S_out, const void *x, const float *weights, void *out, int64_t H, int64_t I,
                int64_t G, int threads, float *scratch) {
    const int layout = input_layout(fmt, is_bf16, G), planes = input_planes(layout, G);
    const int64_t in_row = input_row_floats(planes, H), m_row = input_row_floats(planes, I); /* prepared inputs */
    float *xs = scratch, *h = xs + in_row, *m = h + (int64_t)count * 2 * I, *y = m + (int64_t)count * m_row;
    prepare_input(layout, planes, is_bf16, x, xs, H);
    const float *x_in[count], *m_in[count];
    void *h_out[count], *y_out[count];
    for (int i = 0; i < count; i++) {
        x_in[i] = xs;
        m_in[i] = m + i * m_row;
        h_out[i] = h + i * 2 * I;
        y_out[i] = y + i * H;
    }
    const QRowSet in = {fmt, is_bf16, 0, layout, planes, count, 2 * I, H, G, W_in, S_in, x_in, h_out};
    const QRowSet down = {fmt, is_bf16, 0, layout, planes, count, H, I, G, W_out, S_out, m_in, y_out};
#pragma omp parallel num_threads(threads)
    {
        qstream_rows(&in);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t item = 0; item < (int64_t)count * I; item++) {
            const int64_t i = item / I, j = item % I;
            const float v = silu_times(h[i * 2 * I + j], h[i * 2 * I + I + j], is_bf16);
            place_input(layout, m + i * m_row, I, j, v); /* laid out as prepare_input lays an input out */
            h[i * 2 * I + j] = v; /* in order, for the planes: only this item reads the gate's j */
        }
        if (planes) {
#pragma omp for schedule(static)
            for (int64_t item = 0; item < (int64_t)count * (I / 32); item++) {
                const int64_t i = item / (I / 32), g = item % (I / 32);
                q4p_prepare_group(h + i * 2 * I + 32 * g, g, I, (int8_t *)(m + i * m_row + I));
            }
#pragma omp for schedule(static)
            for (int i = 0; i < count; i++) q4p_pad(I, (int8_t *)(m + i * m_row + I));
        }
        qstream_rows(&down);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t n = 0; n < H; n++) { /* the weighted sum is fp32; the layer's output has x's dtype */
            float sum = 0.0f;
            for (int i = 0; i < count; i++) sum += weights[i] * (is_bf16 ? round_bf16(y[i * H + n]) : y[i * H + n]);
            if (is_bf16) ((uint16_t *)out)[n] = f32_to_bf16(sum);
            else ((float *)out)[n] = sum;
        }
    }
}
