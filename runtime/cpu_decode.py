"""The CPU decode path of the dense part, put in place on a model (or one decoder layer) in one call.

With `accelerator: cpu` the engine applies it to the loaded model, and the profiler to the decoder layer
it times, so that the profile measures the code the runtime runs: projections through the GEMV kernel,
RMSNorm and one-query attention in C (runtime/kernels/decode_ops.c). The MoE routers run their own
forward: a C router measured within noise of it (0.991 of the decode time, bench/results/decode_ab_router_avx2.md).
"""
from __future__ import annotations

import torch

from .decode_attention import use_cpu_decode_attention
from .dense_linear import KernelLinear, use_kernel_for_dense
from .dense_norm import use_kernel_for_norms
from .kernels import GemvKernel
from .kernels.decode_ops import load_decode_ops


def use_cpu_decode_path(model: torch.nn.Module, skip: list[torch.nn.Module], kernel: GemvKernel | None,
                        threads: int) -> None:
    """Swap in the kernel projections, C norms and attention where they apply (nothing without a kernel)."""
    if kernel is None:
        return
    use_kernel_for_dense(model, skip, kernel, threads)
    ops = load_decode_ops()
    use_kernel_for_norms(model, ops)
    use_cpu_decode_attention(model, ops)


def set_kernel_threads(model: torch.nn.Module, threads: int) -> None:
    """The thread count of every kernel projection (the profiler times one layer at several)."""
    for m in model.modules():
        if isinstance(m, KernelLinear):
            m.set_threads(threads)
