/* The int8/int4 kernels of qgemv.c built once more for CPUs with AVX512-VNNI and AVX512-VL, as
 * qgemv_multi_vnni and qmoe_token_vnni: one token's factored int4 pairs of groups sum their byte products
 * with vpdpbusd (q4planes.h) instead of vpmaddubsw, an add and vpmaddwd; everything else is qgemv.c's AVX2
 * code. runtime/kernels/__init__.py calls these entry points where the CPU has both extensions
 * (docs/benchmarks.md, "int4 with AVX512-VNNI"). */
#define QGEMV_VNNI 1
#include "qgemv.c"
