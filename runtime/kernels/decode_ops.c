/* The dense part's small operations at one decode token: RMSNorm, and the attention of one query over the
 * KV cache. At one token each of them costs more in torch's per-op dispatch (RMSNorm is eight ops, the
 * attention a dispatch into its flash kernel) than in arithmetic: bench/results/decode_breakdown_avx2_run2.md.
 * Each follows the rounding of the transformers code it stands in for, so that its output is the
 * reference's up to the order of fp32 sums. Compiled with gemv.c into one library (runtime/kernels);
 * the loader builds it only where the CPU has AVX2 and FMA. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "hsum.h"

static inline float load_elem(const void *p, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_elem(void *p, int64_t i, float v, int is_bf16) {
    if (is_bf16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* Llama-style RMSNorm over the last dimension, as transformers writes it:
 *   h = x.float();  h = h * rsqrt(mean(h^2) + eps);  y = weight * h.to(x.dtype)
 * x and y are [rows, H] contiguous, weight [H], all in one dtype (bf16: h rounded to bf16, then the
 * product with the weight rounded again, as torch's bf16 multiply does). */
__attribute__((target("avx2,fma")))
void rms_norm(int is_bf16, const void *x, const void *weight, void *y, int64_t rows, int64_t H, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < H; k++) {
            const float v = load_elem(x, r * H + k, is_bf16);
            sum += v * v;
        }
        const float inv = 1.0f / sqrtf(sum / (float)H + eps);
        for (int64_t k = 0; k < H; k++) {
            float h = load_elem(x, r * H + k, is_bf16) * inv;
            if (is_bf16) h = round_bf16(h);
            store_elem(y, r * H + k, load_elem(weight, k, is_bf16) * h, is_bf16);
        }
    }
}

/* 8 elements at p + i as fp32 (a bf16 widened by a 16-bit shift) */
__attribute__((target("avx2,fma"), always_inline))
static inline __m256 load8(const void *p, int64_t i, int is_bf16) {
    if (is_bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
    return _mm256_loadu_ps((const float *)p + i);
}

/* q . k_j for R consecutive positions j (R <= 4): R independent FMA chains, where one position alone
 * would wait on a single chain's latency */
__attribute__((target("avx2,fma"), always_inline))
static inline void dot_rows(const float *qf, const void *k, int64_t base, int64_t pos_stride, int64_t D,
                            int is_bf16, const int R, float *dots) {
    __m256 a[4];
    for (int r = 0; r < R; r++) a[r] = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qf + d);
        for (int r = 0; r < R; r++) a[r] = _mm256_fmadd_ps(qv, load8(k, base + r * pos_stride + d, is_bf16), a[r]);
    }
    for (int r = 0; r < R; r++) {
        float dot = hsum256(a[r]);
        for (int64_t t = d; t < D; t++) dot += qf[t] * load_elem(k, base + r * pos_stride + t, is_bf16);
        dots[r] = dot;
    }
}

/* acc[0:D] += sum_j p[j] v_j over L positions. Each 64-wide slice of the row sums in eight registers across
 * the positions: accumulating in memory would chain every position's FMA through a store and a reload. */
__attribute__((target("avx2,fma"), always_inline))
static inline void weighted_rows(float *acc, const float *p, const void *v, int64_t base, int64_t pos_stride,
                                 int64_t L, int64_t D, int is_bf16) {
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) {
        __m256 a[8];
        for (int r = 0; r < 8; r++) a[r] = _mm256_loadu_ps(acc + d0 + 8 * r);
        for (int64_t j = 0; j < L; j++) {
            const __m256 pj = _mm256_set1_ps(p[j]);
            for (int r = 0; r < 8; r++)
                a[r] = _mm256_fmadd_ps(pj, load8(v, base + j * pos_stride + d0 + 8 * r, is_bf16), a[r]);
        }
        for (int r = 0; r < 8; r++) _mm256_storeu_ps(acc + d0 + 8 * r, a[r]);
    }
    for (int64_t d = d0; d < D; d++) {
        float sum = acc[d];
        for (int64_t j = 0; j < L; j++) sum += p[j] * load_elem(v, base + j * pos_stride + d, is_bf16);
        acc[d] = sum;
    }
}

/* e^x for 8 lanes with x <= 0 (softmax numerators), to about 1 ulp: Cody-Waite reduction to
 * r in [-ln2/2, ln2/2] and Cephes' degree-6 polynomial, as vectorised exps (torch's among them) do; a
 * scalar expf per position cost as much as both matrix products at short contexts. */
__attribute__((target("avx2,fma"), always_inline))
static inline __m256 exp8_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));  /* below: e^x < 1.7e-38, within 1e-38 of 0 */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(scale));
}

/* p[j] = e^(p[j] - top), rounded to bf16 if asked (the values are in [0, 1]: no NaN to keep); returns the
 * sum of the unrounded values. */
__attribute__((target("avx2,fma"), always_inline))
static inline float softmax_numerators(float *p, int64_t L, float top, int round_to_bf16) {
    const __m256 t = _mm256_set1_ps(top);
    const __m256i keep = _mm256_set1_epi32((int)0xFFFF0000u);
    __m256 sums = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= L; j += 8) {
        const __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + j), t));
        sums = _mm256_add_ps(sums, e);
        __m256i u = _mm256_castps_si256(e);
        if (round_to_bf16)  /* round to nearest even on the top 16 bits, as f32_to_bf16 */
            u = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                 _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)))), keep);
        _mm256_storeu_ps(p + j, _mm256_castsi256_ps(u));
    }
    float sum = hsum256(sums);
    for (; j < L; j++) {
        const float e = expf(p[j] - top);
        sum += e;
        p[j] = round_to_bf16 ? round_bf16(e) : e;
    }
    return sum;
}

/* Scaled dot-product attention of one query token over L cached positions, with grouped-query heads
 * (query head h reads KV head h / (Hq / Hkv)) and no mask (the caller passes only unmasked decode steps):
 *   out[h] = sum_j p_j v_j / sum_j p_j,   p_j = exp(scale * q_h . k_j - max)
 * in fp32, as torch's CPU flash-attention kernel computes it; for bf16 it rounds p_j to bf16 before the
 * product with V, as that kernel does, and the output once at the end.
 * q is [Hq, D] with head stride q_head; K and V are [Hkv, L, D] with head and position strides (a view of
 * a longer cache buffer is fine; D is contiguous); out is [Hq, D] contiguous. scratch holds Hq * (L + D)
 * floats. Work is split by KV head, and within one the positions go in blocks of BLOCK: a block of K or V
 * rows is read from memory for the group's first query head and from L1 for the others, so a long cache
 * is streamed once per KV head rather than once per query head (measured on the AVX2 development machine
 * at 2048 positions: 3.3 ms for torch's bf16 sdpa, 0.72 ms reading once per query head, less now).
 * Threads split the KV heads only when the cache is long enough to pay for a thread wake-up. */
#define BLOCK 64
__attribute__((target("avx2,fma")))
void attend_one(int is_bf16, const void *q, const void *k, const void *v, void *out, int64_t Hq, int64_t Hkv,
                int64_t L, int64_t D, int64_t q_head, int64_t k_head, int64_t k_pos, int64_t v_head, int64_t v_pos,
                float scale, int threads, float *scratch) {
    const int64_t group = Hq / Hkv;
#pragma omp parallel for num_threads(threads) schedule(static) if (Hq * L * D >= (1 << 18))
    for (int64_t g = 0; g < Hkv; g++) {
        float *scores = scratch + g * group * L;               /* [group][L] */
        float *acc = scratch + Hq * L + g * group * D;         /* [group][D] */
        float qf[group][D], total[group];
        for (int64_t i = 0; i < group; i++) {
            for (int64_t d = 0; d < D; d++) {
                qf[i][d] = load_elem(q, (g * group + i) * q_head + d, is_bf16);
                acc[i * D + d] = 0.0f;
            }
        }
        for (int64_t j0 = 0; j0 < L; j0 += BLOCK) {
            const int64_t j1 = j0 + BLOCK < L ? j0 + BLOCK : L;
            for (int64_t i = 0; i < group; i++) {
                int64_t j = j0;
                for (; j + 4 <= j1; j += 4) dot_rows(qf[i], k, g * k_head + j * k_pos, k_pos, D, is_bf16, 4, scores + i * L + j);
                for (; j < j1; j++) dot_rows(qf[i], k, g * k_head + j * k_pos, k_pos, D, is_bf16, 1, scores + i * L + j);
            }
        }
        for (int64_t i = 0; i < group; i++) {
            float *p = scores + i * L, top = -INFINITY;
            for (int64_t j = 0; j < L; j++) {
                p[j] *= scale;
                top = p[j] > top ? p[j] : top;
            }
            total[i] = softmax_numerators(p, L, top, is_bf16);
        }
        for (int64_t j0 = 0; j0 < L; j0 += BLOCK) {
            const int64_t n = (j0 + BLOCK < L ? BLOCK : L - j0);
            for (int64_t i = 0; i < group; i++)
                weighted_rows(acc + i * D, scores + i * L + j0, v, g * v_head + j0 * v_pos, v_pos, n, D, is_bf16);
        }
        for (int64_t i = 0; i < group; i++)
            for (int64_t d = 0; d < D; d++) store_elem(out, (g * group + i) * D + d, acc[i * D + d] / total[i], is_bf16);
    }
}

/* ---- the native decode step (runtime/native_decode.py): a layer's small operations fused per call ---- */

/* These follow torch's elementwise rounding exactly (one rounding per torch op), so they are compiled for the
 * baseline instruction set, where there is no FMA to contract a product and a sum into one rounding; the
 * attribute and pragma keep it so where a compiler is told otherwise. */
#if defined(__clang__)
#define NO_CONTRACT
#define NO_CONTRACT_BODY _Pragma("clang fp contract(off)")
#elif defined(__GNUC__)
#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#define NO_CONTRACT_BODY
#else
#define NO_CONTRACT
#define NO_CONTRACT_BODY
#endif

static inline float rounded(float v, int is_bf16) { return is_bf16 ? round_bf16(v) : v; }

/* The residual add and the next RMSNorm of a decoder layer, as transformers writes them:
 *   s = a + b  (torch's add in the dtype);  y = RMSNorm(s)  (rms_norm above, on s)
 * All [H] contiguous in one dtype; s may be a or b (the sum is taken element by element first). */
NO_CONTRACT
void add_rms_norm(int is_bf16, const void *a, const void *b, void *s, const void *weight, void *y, int64_t H,
                  float eps) {
    NO_CONTRACT_BODY
    for (int64_t k = 0; k < H; k++)
        store_elem(s, k, load_elem(a, k, is_bf16) + load_elem(b, k, is_bf16), is_bf16);
    rms_norm(is_bf16, s, weight, y, 1, H, eps);
}

/* transformers' apply_rotary_pos_emb on one token's heads, in place: x[h] = x[h] * cos + rotate_half(x[h]) * sin,
 * rotate_half(x) = cat(-x[D/2:], x[:D/2]), each product and the sum rounded to the dtype as torch's ops round
 * them. x is [heads, D] contiguous; cos and sin [D] in x's dtype (the model's rotary module's output). */
NO_CONTRACT
static void rope_heads(int is_bf16, void *x, int64_t heads, int64_t D, const void *cos, const void *sin) {
    NO_CONTRACT_BODY
    const int64_t half = D / 2;
    float row[D];
    for (int64_t h = 0; h < heads; h++) {
        for (int64_t d = 0; d < D; d++) row[d] = load_elem(x, h * D + d, is_bf16);
        for (int64_t d = 0; d < D; d++) {
            const float turned = d < half ? -row[d + half] : row[d - half];
            const float a = rounded(row[d] * load_elem(cos, d, is_bf16), is_bf16);
            const float b = rounded(turned * load_elem(sin, d, is_bf16), is_bf16);
            store_elem(x, h * D + d, a + b, is_bf16);
        }
    }
}

/* One decode token's attention after its projections, in one call: rotary embedding of q [Hq, D] and k [Hkv, D]
 * (in place), k and v [Hkv, D] written into the KV cache at position L (buffers with head and position
 * strides, room for L + 1 positions), then attend_one over the L + 1 positions into out [Hq, D]: what
 * transformers' attention forward does between the projections and o_proj with moeplan's cache and
 * attention (runtime/kv_cache.py, runtime/decode_attention.py), the same arithmetic. */
void rope_append_attend(int is_bf16, void *q, void *k, const void *v, const void *cos, const void *sin,
                        void *k_cache, void *v_cache, int64_t Hq, int64_t Hkv, int64_t L, int64_t D,
                        int64_t k_head, int64_t k_pos, int64_t v_head, int64_t v_pos, float scale, int threads,
                        float *scratch, void *out) {
    rope_heads(is_bf16, q, Hq, D, cos, sin);
    rope_heads(is_bf16, k, Hkv, D, cos, sin);
    const size_t elem = is_bf16 ? 2 : 4;
    for (int64_t h = 0; h < Hkv; h++) {
        memcpy((char *)k_cache + (h * k_head + L * k_pos) * elem, (const char *)k + h * D * elem, D * elem);
        memcpy((char *)v_cache + (h * v_head + L * v_pos) * elem, (const char *)v + h * D * elem, D * elem);
    }
    attend_one(is_bf16, q, k_cache, v_cache, out, Hq, Hkv, L + 1, D, D, k_head, k_pos, v_head, v_pos, scale, threads,
               scratch);
}

/* The router of one token, as transformers' softmax top-k routers (Mixtral, Qwen2/3-MoE, OLMoE) write it:
 *   logits = F.linear(x, W)                   fp32 sums, rounded to the model's dtype
 *   probs  = softmax(logits.float())          fp32
 *   top    = topk(probs, k)                   largest first
 *   top   /= top.sum()   (if normalize)
 * x is [H], W [E, H] contiguous, one dtype; logits [E] in that dtype; scores [k] the top values, fp32 or bf16
 * (`scores_bf16`: the Qwen and OLMoE routers cast them to the logits' dtype), top_index [k]; scratch H + E
 * floats.
 * Returns 1 without a result when two of the k + 1 largest probabilities are equal: torch's topk orders
 * equal values in a way of its own, so the caller runs the module's own forward then. */
__attribute__((target("avx2,fma")))
int route_one(int is_bf16, const void *x, const void *w, void *logits, int64_t E, int64_t H, int64_t k,
              int normalize, void *scores, int scores_bf16, int64_t *top_index, float *scratch) {
    float *xf = scratch, *p = scratch + H;  /* [H] input widened, [E] probabilities */
    for (int64_t d = 0; d < H; d++) xf[d] = load_elem(x, d, is_bf16);
    int64_t e = 0;
    for (; e + 4 <= E; e += 4) dot_rows(xf, w, e * H, H, H, is_bf16, 4, p + e);
    for (; e < E; e++) dot_rows(xf, w, e * H, H, H, is_bf16, 1, p + e);
    float top = -INFINITY;
    for (e = 0; e < E; e++) {
        if (is_bf16) p[e] = round_bf16(p[e]);
        store_elem(logits, e, p[e], is_bf16);
        top = p[e] > top ? p[e] : top;
    }
    float sum = 0.0f;
    for (e = 0; e < E; e++) {
        p[e] = expf(p[e] - top);
        sum += p[e];
    }
    for (e = 0; e < E; e++) p[e] /= sum;
    /* the k + 1 largest, largest first (the k + 1st only to see a tie at the edge of the top k); with
     * them in descending order, equal values are neighbours */
    const int64_t n = k < E ? k + 1 : E;
    int64_t order[n];
    char taken[E];
    for (e = 0; e < E; e++) taken[e] = 0;
    for (int64_t r = 0; r < n; r++) {
        int64_t best = -1;
        for (e = 0; e < E; e++)
            if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
        if (best < 0) return 1; /* no experts: nothing the kernel answers (the module's forward runs) */
        taken[best] = 1;
        order[r] = best;
        if (r > 0 && p[best] == p[order[r - 1]]) return 1;
    }
    float picked_sum = 0.0f;
    for (int64_t r = 0; r < k; r++) picked_sum += p[order[r]];
    for (int64_t r = 0; r < k; r++) {
        top_index[r] = order[r];
        store_elem(scores, r, normalize ? p[order[r]] / picked_sum : p[order[r]], scores_bf16);
    }
    return 0;
}
