/* The sum of an AVX2 register's eight floats, shared by the kernels. */
#ifndef MOEPLAN_HSUM_H
#define MOEPLAN_HSUM_H
#include <immintrin.h>

__attribute__((target("avx2,fma"), always_inline))
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
