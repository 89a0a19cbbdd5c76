/* Stand-ins for the CPU kernel in bench/diagnostics/decode_breakdown.py: each keeps the kernel's threads
 * busy for as long as the kernel would take, doing something else, so that the decode's Python between the
 * calls runs after pauses of the same length but with different things done to the caches in them:
 *   spin:   arithmetic on registers only (no memory, and no PAUSE instruction, which a hypervisor may
 *           take as a spinning lock and deschedule the vCPU for);
 *   reread: each thread re-reads its half of a small buffer (the caller passes one that fits in L3);
 *   read:   a plain read of the weights themselves, each thread one contiguous half, no prefetch hint
 *           (the kernel reads four far-apart streams per thread with non-temporal prefetches);
 *   read4:  the kernel's own access pattern without its arithmetic: each thread's half as four far-apart
 *           streams advanced together, 32 bytes at a time, each with the non-temporal prefetch the kernel
 *           issues (runtime/kernels/gemv.c, stream_rows): the rate the kernel would reach if its
 *           arithmetic cost nothing.
 * Built by bench/diagnostics/decode_breakdown.py with the C compiler the runtime's kernels use.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <time.h>

#include "stream_access.h"  /* the kernel's STREAMS and PREFETCH_BYTES (runtime/kernels) */

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

double standin_spin(double seconds, int threads) {
    double total = 0.0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        double end = now() + seconds, a = 1.0;
        while (now() < end)
            for (int i = 0; i < 256; i++) a = a * 1.0000001 + 1e-9;
        total += a;
    }
    return total;  /* returned so that the loop is not optimised away */
}

/* integer adds: the bytes read as floats may hold anything, and denormals would slow float adds down */
static int32_t sum_words(const int32_t *p, int64_t n) {
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a = _mm256_add_epi32(a, _mm256_loadu_si256((const __m256i *)(p + i)));
        b = _mm256_add_epi32(b, _mm256_loadu_si256((const __m256i *)(p + i + 8)));
    }
    int32_t lanes[8], total = 0;
    _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi32(a, b));
    for (int j = 0; j < 8; j++) total += lanes[j];
    for (; i < n; i++) total += p[i];
    return total;
}

int32_t standin_reread(const int32_t *buffer, int64_t words, double seconds, int threads) {
    int32_t total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t share = words / n;
        double end = now() + seconds;
        while (now() < end) total += sum_words(buffer + t * share, share);
    }
    return total;
}

int32_t standin_read(const int32_t *weights, int64_t words, int threads) {
    int32_t total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t share = words / n;
        int64_t first = t * share, count = t == n - 1 ? words - first : share;
        total += sum_words(weights + first, count);
    }
    return total;
}

int32_t standin_read4(const int32_t *weights, int64_t words, int threads) {
    int32_t total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads();
        int64_t lo = words * t / n, hi = words * (t + 1) / n;
        int64_t segment = ((hi - lo) / STREAMS) & ~(int64_t)7;  /* whole 32-byte steps */
        __m256i a[STREAMS];
        for (int s = 0; s < STREAMS; s++) a[s] = _mm256_setzero_si256();
        for (int64_t i = 0; i < segment; i += 8)
            for (int s = 0; s < STREAMS; s++) {
                const int32_t *q = weights + lo + s * segment + i;
                _mm_prefetch((const char *)q + PREFETCH_BYTES, _MM_HINT_NTA);
                a[s] = _mm256_add_epi32(a[s], _mm256_loadu_si256((const __m256i *)q));
            }
        int32_t lanes[8];
        for (int s = 1; s < STREAMS; s++) a[0] = _mm256_add_epi32(a[0], a[s]);
        _mm256_storeu_si256((__m256i *)lanes, a[0]);
        for (int j = 0; j < 8; j++) total += lanes[j];
        total += sum_words(weights + lo + STREAMS * segment, hi - lo - STREAMS * segment);
    }
    return total;
}
