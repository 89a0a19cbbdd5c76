/* The gate between an expert's projections, SiLU(g) * u, shared by the float and the int kernels. */
#ifndef MOEPLAN_SILU_GATE_H
#define MOEPLAN_SILU_GATE_H
#include <math.h>

#include "bf16.h"

/* Rounded to bf16 where torch's bf16 ops round (each matmul output, the SiLU, the product). */
static inline float silu_times(float g, float u, int is_bf16) {
    if (!is_bf16) return g / (1.0f + expf(-g)) * u;
    g = round_bf16(g);
    u = round_bf16(u);
    return round_bf16(round_bf16(g / (1.0f + expf(-g))) * u);
}

#endif
