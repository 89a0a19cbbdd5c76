/* The arithmetic ceiling of one-token int4 on this CPU: four rows side by side (as qgemv.c reads them), codes
 * and inputs in L1, no memory traffic and no per-group scales, so that what is timed is the multiply-adds
 * alone. G weights per second per thread, three ways, each checked once against a scalar sum of the same
 * codes and inputs before it is timed:
 *   planes256  the kernel's own q4p_pair (q4planes.h, QGEMV_VNNI build): six 256-bit vpdpbusd per row per
 *              64 weights against the input's three byte planes (exact for any bf16 input);
 *   planes512  the same products on 512-bit registers: three vpdpbusd per row per 64 weights, the input's
 *              planes loaded once per pair of groups for all four rows;
 *   bf16dp     the codes turned into bf16 words by two byte-table lookups (vpshufb) and multiplied by the
 *              bf16 inputs with vdpbf16ps: two per row per 64 weights (exact products, fp32 sums).
 * Needs AVX512-VNNI and AVX512-BF16 (AMD Zen 4, Intel Cooper Lake and later). Build and run from the
 * repository root:
 *   gcc -O3 -mavx2 -mfma -Iruntime/kernels bench/diagnostics/int4_arith.c -o "$SCRATCH/int4_arith" && "$SCRATCH/int4_arith" */
#define QGEMV_VNNI 1
#include "q4planes.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define K 1024 /* inputs of a row: 16 pairs of 32-input groups */
#define PAIRS (K / 64)
#define ROWS 4
#define AVX512 "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512bf16,avx2,fma"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* Code k of a row: byte k / 2, the low nibble for even k (runtime/contracts/expert_format.py's packing). */
static int code_at(const uint8_t *row, int k) { return k & 1 ? row[k / 2] >> 4 : row[k / 2] & 15; }

__attribute__((target(INT_TARGET), noinline)) static void planes256(const uint8_t *const *w, const int8_t *planes,
                                                                    double *sums) {
    __m256 a[ROWS];
    for (int r = 0; r < ROWS; r++) a[r] = _mm256_setzero_ps();
    for (int p = 0; p < PAIRS; p++)
        for (int r = 0; r < ROWS; r++)
            a[r] = _mm256_add_ps(a[r], _mm256_cvtepi32_ps(q4p_pair(w[r] + 32 * p, planes + Q4P_PAIR_BYTES * p)));
    for (int r = 0; r < ROWS; r++) {
        float v[8];
        _mm256_storeu_ps(v, a[r]);
        sums[r] = 0;
        for (int i = 0; i < 8; i++) sums[r] += v[i];
    }
}

__attribute__((target(AVX512), noinline)) static void planes512(const uint8_t *const *w, const int8_t *planes,
                                                               double *sums) {
    __m512 a[ROWS];
    for (int r = 0; r < ROWS; r++) a[r] = _mm512_setzero_ps();
    for (int p = 0; p < PAIRS; p++) {
        const int8_t *xp = planes + Q4P_PAIR_BYTES * p; /* per plane: 32 even inputs, then 32 odd */
        const __m512i lo = _mm512_loadu_si512(xp), mid = _mm512_loadu_si512(xp + 64), hi = _mm512_loadu_si512(xp + 128);
        for (int r = 0; r < ROWS; r++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w[r] + 32 * p));
            const __m512i c = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1),
                                               _mm512_set1_epi8(15)); /* even codes, then odd */
            const __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, lo);
            const __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, mid);
            const __m512i s2 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, hi);
            const __m512i s = _mm512_add_epi32(_mm512_add_epi32(s0, _mm512_slli_epi32(s1, 8)), _mm512_slli_epi32(s2, 16));
            a[r] = _mm512_add_ps(a[r], _mm512_cvtepi32_ps(s));
        }
    }
    for (int r = 0; r < ROWS; r++) sums[r] = _mm512_reduce_add_ps(a[r]);
}

/* bf16 inputs in the order the lookups give the words: per pair, xb[64 p + i] for w0's word i and
 * xb[64 p + 32 + i] for w1's (see bf16dp_layout). */
__attribute__((target(AVX512), noinline)) static void bf16dp(const uint8_t *const *w, const uint16_t *xb, double *sums) {
    /* bf16(code - 8) for the 16 codes: its low bytes, then its high bytes, in each 128-bit lane */
    const __m512i tlo = _mm512_broadcast_i32x4(_mm_setr_epi8(0x00, (char)0xe0, (char)0xc0, (char)0xa0, (char)0x80,
                                                             0x40, 0x00, (char)0x80, 0x00, (char)0x80, 0x00, 0x40,
                                                             (char)0x80, (char)0xa0, (char)0xc0, (char)0xe0));
    const __m512i thi = _mm512_broadcast_i32x4(_mm_setr_epi8((char)0xc1, (char)0xc0, (char)0xc0, (char)0xc0,
                                                             (char)0xc0, (char)0xc0, (char)0xc0, (char)0xbf, 0x00,
                                                             0x3f, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40));
    __m512 a[ROWS];
    for (int r = 0; r < ROWS; r++) a[r] = _mm512_setzero_ps();
    for (int p = 0; p < PAIRS; p++) {
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xb + 64 * p), x1 = (__m512bh)_mm512_loadu_si512(xb + 64 * p + 32);
        for (int r = 0; r < ROWS; r++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(w[r] + 32 * p));
            const __m512i c = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1),
                                               _mm512_set1_epi8(15));
            const __m512i lo = _mm512_shuffle_epi8(tlo, c), hi = _mm512_shuffle_epi8(thi, c);
            const __m512bh w0 = (__m512bh)_mm512_unpacklo_epi8(lo, hi), w1 = (__m512bh)_mm512_unpackhi_epi8(lo, hi);
            a[r] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(a[r], w0, x0), w1, x1);
        }
    }
    for (int r = 0; r < ROWS; r++) sums[r] = _mm512_reduce_add_ps(a[r]);
}

/* The input (within its pair of groups) behind word i of w0 (i < 32) or w1 (i >= 32): unpacklo takes bytes
 * 0-7 of each 128-bit lane of the codes, unpackhi bytes 8-15; code byte b < 32 is input 2b's (low nibble),
 * b >= 32 input 2(b - 32) + 1's. */
static int bf16dp_layout(int i) {
    const int half = i / 32, j = i % 32, b = 16 * (j / 8) + 8 * half + j % 8;
    return b < 32 ? 2 * b : 2 * (b - 32) + 1;
}

static uint16_t to_bf16(float f) { /* the test values below are bf16 already: truncation is exact */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

int main(void) {
    uint8_t *codes = aligned_alloc(64, ROWS * K / 2);
    int8_t *planes = aligned_alloc(64, PAIRS * Q4P_PAIR_BYTES);
    uint16_t *xb = aligned_alloc(64, 2 * K);
    int32_t X[K];
    float x[K];
    srand(1);
    for (int i = 0; i < ROWS * K / 2; i++) codes[i] = (uint8_t)rand();
    for (int k = 0; k < K; k++) {
        X[k] = rand() % (1 << 19) - (1 << 18); /* the planes' integers: three signed bytes */
        x[k] = (float)(rand() % 255 - 127) / 64.0f; /* bf16 inputs: 8 significant bits */
    }
    for (int p = 0; p < PAIRS; p++)
        for (int b = 0; b < 64; b++) {
            const int k = 64 * p + (b < 32 ? 2 * b : 2 * (b - 32) + 1), v = X[k];
            const int lo = (int8_t)(v & 255), mid = (int8_t)(((v - lo) >> 8) & 255), hi = (v - lo - mid * 256) >> 16;
            planes[Q4P_PAIR_BYTES * p + b] = (int8_t)lo;
            planes[Q4P_PAIR_BYTES * p + 64 + b] = (int8_t)mid;
            planes[Q4P_PAIR_BYTES * p + 128 + b] = (int8_t)hi;
        }
    for (int p = 0; p < PAIRS; p++)
        for (int i = 0; i < 64; i++) xb[64 * p + i] = to_bf16(x[64 * p + bf16dp_layout(i)]);
    const uint8_t *w[ROWS];
    double want_planes[ROWS], want_bf16[ROWS], got[ROWS];
    for (int r = 0; r < ROWS; r++) {
        w[r] = codes + r * K / 2;
        want_planes[r] = want_bf16[r] = 0;
        for (int k = 0; k < K; k++) {
            want_planes[r] += (double)code_at(w[r], k) * X[k];
            want_bf16[r] += (double)(code_at(w[r], k) - 8) * x[k];
        }
    }
    struct { const char *name; int kind; } ways[] = {{"planes256", 0}, {"planes512", 1}, {"bf16dp", 2}};
    for (int i = 0; i < 3; i++) {
        const int kind = ways[i].kind;
        if (kind == 0) planes256(w, planes, got);
        else if (kind == 1) planes512(w, planes, got);
        else bf16dp(w, xb, got);
        for (int r = 0; r < ROWS; r++) {
            const double want = kind == 2 ? want_bf16[r] : want_planes[r];
            if (fabs(got[r] - want) > 1e-5 * fabs(want) + 1e-3) {
                printf("%s: row %d sums %.6g, want %.6g\n", ways[i].name, r, got[r], want);
                return 1;
            }
        }
    }
    const long n = 200000;
    double sink = 0;
    for (int round = 0; round < 3; round++) {
        printf("round %d, G weights/s on one thread:", round + 1);
        for (int i = 0; i < 3; i++) {
            const double t = now();
            for (long j = 0; j < n; j++) {
                if (ways[i].kind == 0) planes256(w, planes, got);
                else if (ways[i].kind == 1) planes512(w, planes, got);
                else bf16dp(w, xb, got);
                sink += got[0];
            }
            printf(" %s %.1f", ways[i].name, (double)ROWS * K * n / (now() - t) / 1e9);
        }
        printf("\n");
    }
    return sink == 0.123; /* keeps the sums alive */
}
