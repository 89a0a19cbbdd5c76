"""The CPU decode path of the dense part, put in place on a model (or one decoder layer) in one call.

With `accelerator: cpu` the engine applies it to the loaded model, and the profiler to the decoder layer
it times, so that the profile measures the code the runtime runs: projections through the GEMV kernel,
RMSNorm and one-query attention in C (runtime/kernels/decode_ops.c), and the softmax top-k routers in one C
call where it reproduces them (runtime/dense_router.py). A router it does not (PhiMoE's sparsemixer, tied
probabilities) runs its own forward with its one-token product through torch's own GEMM rather than
oneDNN's, which spends 24 us back to back and about 150 us after the kernels' pauses on a [1, 1024] by
[8, 1024] bf16 product (torch's GEMM: 4 us) on the Zen 4 machine (docs/benchmarks.md).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .decode_attention import use_cpu_decode_attention
from .dense_linear import KernelLinear, use_kernel_for_dense
from .dense_norm import use_kernel_for_norms
from .dense_router import routers, use_kernel_for_routers
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
    use_kernel_for_routers(model, ops)
    use_plain_gemm_for_routers(model)


def use_plain_gemm_for_routers(model: torch.nn.Module) -> int:
    """Each MoE router (dense_router.routers: the C one too, for the calls it hands to the module's own
    forward) runs a one-token input with oneDNN off, so that torch computes its product with its own GEMM:
    fp32 sums rounded to the model's dtype as oneDNN's are, in another order (the last bit of about 1 logit in
    100 to 1,000 differs, as the GEMV kernel's projections differ from torch's). Every path that decodes on
    this model calls the router so (the native step and transformers' forward alike). Returns how many."""
    count = 0
    for _, _, router in routers(model):
        if "forward" not in router.__dict__:
            router.forward = _one_token_without_onednn(router.forward)
            count += 1
    return count


def _one_token_without_onednn(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if hidden.numel() != hidden.shape[-1] or hidden.device.type != "cpu":  # more than one token: oneDNN wins
            return forward(hidden, *args, **kwargs)
        # the C switch torch.backends.mkldnn.flags() sets, without that context manager's Python per call
        was = torch._C._get_mkldnn_enabled()
        torch._C._set_mkldnn_enabled(False)
        try:
            return forward(hidden, *args, **kwargs)
        finally:
            torch._C._set_mkldnn_enabled(was)

    return run


def set_kernel_threads(model: torch.nn.Module, threads: int) -> None:
    """The thread count of every kernel projection (the profiler times one layer at several)."""
    for m in model.modules():
        if isinstance(m, KernelLinear):
            m.set_threads(threads)
