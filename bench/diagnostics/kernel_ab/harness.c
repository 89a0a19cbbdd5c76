/* The one-token AVX2 kernel of gemv.c: a layer's two experts through moe_token, and one [2I, H] projection
 * through gemv_one (a dense projection's call), each against a plain two-thread read of the same number of
 * bytes, alternating, over a pool of experts larger than the caches; prints the medians. Built twice by
 * run.sh, from a base revision's gemv.c and from the working tree's, to compare them on one machine.
 * Arguments: bf16 (0 or 1), repeats, hidden, intermediate, huge pages (0 or 1), threads, and optionally the
 * instruction set (gemv.c's ISA_AVX2 1, the default, or ISA_AVX512 2).
 * Output: moe GB/s, moe / read, projection GB/s, projection / read. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

void moe_token(int isa, int is_bf16, int count, const void **W_in, const void **W_out, const void *x,
               const float *weights, void *out, int64_t H, int64_t I, int threads, float *scratch);
void gemv_one(int isa, int is_bf16, const void *W, const void *x, void *y, int64_t T, int64_t N, int64_t K,
              int threads, float *scratch, int out_bf16);

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double read_all(const float *p, size_t n, int threads) {
    double total = 0;
#pragma omp parallel for num_threads(threads) reduction(+ : total) schedule(static)
    for (size_t c = 0; c < n; c += 4096) {
        __m256 a = _mm256_setzero_ps(), b = a, d = a, e = a;
        for (size_t i = c; i < c + 4096; i += 32) {
            a = _mm256_add_ps(a, _mm256_load_ps(p + i));
            b = _mm256_add_ps(b, _mm256_load_ps(p + i + 8));
            d = _mm256_add_ps(d, _mm256_load_ps(p + i + 16));
            e = _mm256_add_ps(e, _mm256_load_ps(p + i + 24));
        }
        float o[8];
        _mm256_storeu_ps(o, _mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(d, e)));
        total += o[0];
    }
    return total;
}

static double median(double *v, int n) {
    qsort(v, n, sizeof(double), by_value);
    return v[n / 2];
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: harness BF16 REPEATS HIDDEN INTERMEDIATE HUGE THREADS [ISA]\n");
        return 1;
    }
    const int bf16 = atoi(argv[1]), repeats = atoi(argv[2]) > 200 ? 200 : atoi(argv[2]);
    const int64_t H = atoll(argv[3]), I = atoll(argv[4]);
    const int huge = atoi(argv[5]), threads = atoi(argv[6]), isa = argc > 7 ? atoi(argv[7]) : 1;
    const size_t size = bf16 ? 2 : 4, expert = (size_t)3 * H * I * size, proj = (size_t)2 * H * I * size;
    int count = (int)(3e9 / expert);
    count = count < 6 ? 6 : count;
    const size_t pool = expert * count, align = (size_t)2 << 20;
    char *raw = mmap(NULL, pool + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *P = (char *)(((uintptr_t)raw + align - 1) & ~(uintptr_t)(align - 1));
    madvise(P, pool, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
    memset(P, 0, pool);
    /* scratch for either revision's moe_token (2 experts: 2 * (4I + 2 + H) floats) and gemv_one (AVX2 bf16: H) */
    float *x = aligned_alloc(64, sizeof(float) * H), *scratch = aligned_alloc(64, sizeof(float) * 2 * (4 * I + 2 + H));
    uint16_t *xb = aligned_alloc(64, 2 * H);
    for (int64_t i = 0; i < H; i++) x[i] = 0.01f, xb[i] = 0x3c23;
    void *out = aligned_alloc(64, 4 * H), *y = aligned_alloc(64, 4 * 2 * I);
    const float gates[2] = {0.5f, 0.5f};
    double moe_s[200], moe_read_s[200], proj_s[200], proj_read_s[200];
    int e = 0;
    for (int r = 0; r < repeats; r++) {
        const void *w_in[2], *w_out[2];
        for (int j = 0; j < 2; j++) {
            char *base = P + (size_t)((e + j) % count) * expert;
            w_in[j] = base;
            w_out[j] = base + proj;
        }
        double t0 = now();
        moe_token(isa, bf16, 2, w_in, w_out, bf16 ? (void *)xb : (void *)x, gates, out, H, I, threads, scratch);
        moe_s[r] = now() - t0;
        e = (e + 2) % count;
        int first = e + 2 <= count ? e : 0;  /* two other experts' bytes, contiguous */
        t0 = now();
        volatile double sink = read_all((const float *)(P + (size_t)first * expert), 2 * expert / 4, threads);
        moe_read_s[r] = now() - t0;
        e = (first + 2) % count;
        t0 = now();  /* one [2I, H] projection of another expert, then a read of as many bytes */
        gemv_one(isa, bf16, P + (size_t)e * expert, bf16 ? (void *)xb : (void *)x, y, 1, 2 * I, H, threads, scratch,
                 bf16);
        proj_s[r] = now() - t0;
        e = (e + 1) % count;
        t0 = now();
        sink = read_all((const float *)(P + (size_t)e * expert), proj / 4, threads);
        (void)sink;
        proj_read_s[r] = now() - t0;
        e = (e + 1) % count;
    }
    const double moe = 2 * expert / median(moe_s, repeats) / 1e9, moe_read = 2 * expert / median(moe_read_s, repeats) / 1e9;
    const double pr = proj / median(proj_s, repeats) / 1e9, pr_read = proj / median(proj_read_s, repeats) / 1e9;
    printf("%.1f %.2f %.1f %.2f\n", moe, moe / moe_read, pr, pr / pr_read);
    return 0;
}
