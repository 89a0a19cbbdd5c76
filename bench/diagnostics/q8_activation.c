/* The alternative the int kernels did not take, for bench/diagnostics/q8_activation_ab.py: llama.cpp's way
 * of multiplying Q4_0/Q8_0 weights, with the input quantized to int8 per block of 32 (scale absmax / 127)
 * and integer dot products (vpmaddubsw, vpmaddwd), on the weights of runtime/contracts/expert_format.py
 * (group size 32). Read as the kernel reads at one token: each thread's rows as STREAMS far-apart streams
 * with the kernel's prefetch (stream_access.h). Speed only, for a measured comparison: not a kernel of the
 * runtime, whose weights must be exactly the reference's (runtime/kernels/qgemv.c).
 *   xq: per block of 32 inputs, int8 (int4 weights: the 16 even inputs, then the 16 odd ones, as the low
 *   and high nibbles hold them; int8 weights: in order); dx: the block's scale; xsum: the sum of its xq.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "stream_access.h"

__attribute__((target("avx2,fma,f16c"), always_inline)) static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void dots(
    int is_int4, const uint8_t *W, const uint16_t *S, const int8_t *xq, const float *dx, const int32_t *xsum,
    const int64_t *rows, float *out, const int n, int64_t K) {
    const int64_t blocks = K / 32, row_bytes = is_int4 ? K / 2 : K;
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15);
    __m256 acc[STREAMS];
    float corr[STREAMS];
    const uint8_t *w[STREAMS];
    const uint16_t *sc[STREAMS];
    for (int r = 0; r < n; r++) {
        acc[r] = _mm256_setzero_ps();
        corr[r] = 0.0f;
        w[r] = W + rows[r] * row_bytes;
        sc[r] = S + rows[r] * blocks;
    }
    for (int64_t b = 0; b < blocks; b++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * b));
        for (int r = 0; r < n; r++) {
            const float d = _cvtsh_ss(sc[r][b]) * dx[b];
            __m256i p;
            if (is_int4) {
                if (!((16 * b) & 63)) _mm_prefetch((const char *)(w[r] + 16 * b) + PREFETCH_BYTES, _MM_HINT_NTA);
                const __m128i q = _mm_loadu_si128((const __m128i *)(w[r] + 16 * b));
                const __m256i codes = _mm256_and_si256(
                    _mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1), low);
                p = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, xv), ones);
                corr[r] += d * (float)xsum[b]; /* the codes are q + 8 */
            } else {
                if (!((32 * b) & 63)) _mm_prefetch((const char *)(w[r] + 32 * b) + PREFETCH_BYTES, _MM_HINT_NTA);
                const __m256i q = _mm256_loadu_si256((const __m256i *)(w[r] + 32 * b));
                p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q)), ones);
            }
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d), acc[r]);
        }
    }
    for (int r = 0; r < n; r++) out[r] = hsum8(acc[r]) - 8.0f * corr[r] * (float)is_int4;
}

__attribute__((target("avx2,fma,f16c"))) static void dots4(int is_int4, const uint8_t *W, const uint16_t *S,
                                                            const int8_t *xq, const float *dx, const int32_t *xsum,
                                                            const int64_t *rows, float *out, int64_t K) {
    dots(is_int4, W, S, xq, dx, xsum, rows, out, STREAMS, K);
}

__attribute__((target("avx2,fma,f16c"))) static void dots1(int is_int4, const uint8_t *W, const uint16_t *S,
                                                            const int8_t *xq, const float *dx, const int32_t *xsum,
                                                            const int64_t *rows, float *out, int64_t K) {
    dots(is_int4, W, S, xq, dx, xsum, rows, out, 1, K);
}

/* y[N] = W x with x quantized as above; W int4 ([N, K/2] bytes) or int8 ([N, K]), S float16 [N, K/32]. */
void q8_gemv(int is_int4, const uint8_t *W, const uint16_t *S, const int8_t *xq, const float *dx,
             const int32_t *xsum, float *y, int64_t N, int64_t K, int threads) {
#pragma omp parallel num_threads(threads)
    {
        const StreamShare share = stream_share(N, omp_get_num_threads(), omp_get_thread_num());
        for (int64_t step = 0; step < share.segment; step++) {
            int64_t rows[STREAMS];
            const int n = stream_rows_at(&share, step, rows);
            float out[STREAMS];
            if (n == STREAMS) dots4(is_int4, W, S, xq, dx, xsum, rows, out, K);
            else
                for (int r = 0; r < n; r++) dots1(is_int4, W, S, xq, dx, xsum, rows + r, out + r, K);
            for (int r = 0; r < n; r++) y[rows[r]] = out[r];
        }
    }
}
