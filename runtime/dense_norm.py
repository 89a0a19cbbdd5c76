"""RMSNorm on the CPU at decode in one C call instead of eight torch ops.

With `accelerator: cpu` a Mixtral-like model runs two norms per layer per token, and in torch each is
eight dispatched ops (upcast, pow, mean, add, rsqrt, mul, downcast, mul): on the AVX2 development machine
about 100 µs, against 10 µs for the same arithmetic in C (runtime/kernels/decode_ops.c). Each norm module
whose output equals the kernel's on a probe is replaced by a `KernelRMSNorm` holding the same weight, as
`KernelLinear` replaces the dense projections: no modeling code is copied or patched, and a norm with
another formula (Gemma's `1 + weight`, a LayerNorm, an fp32 weight on a bf16 model) keeps its own forward.
"""
from __future__ import annotations

import torch

from .kernels.decode_ops import DTYPES, DecodeOps


class KernelRMSNorm(torch.nn.Module):
    def __init__(self, norm: torch.nn.Module, ops: DecodeOps, eps: float) -> None:
        super().__init__()
        self.weight = norm.weight  # shared, not copied
        self.variance_epsilon = eps
        self.ops = ops
        self._own_forward = norm.forward  # for inputs the kernel does not take (kept out of the module tree)
        # plain attributes: a module's parameter lookup (Module.__getattr__) costs more per call
        self._dtype = norm.weight.dtype
        vars(self)["_weight"] = norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype is not self._dtype or not x.is_cpu or not x.is_contiguous():
            return self._own_forward(x)
        return self.ops.rms_norm(x, self._weight, self.variance_epsilon)


def _epsilon(norm: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    return None


def _matches_kernel(norm: torch.nn.Module, ops: DecodeOps, eps: float) -> bool:
    """The module's own forward against the kernel on a probe of a few rows: equal up to one rounding step
    of the dtype (the fp32 sum of squares is ordered differently), or the module is left alone."""
    weight = norm.weight
    hidden = weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    probe = (torch.randn(3, hidden, generator=generator) * 3).to(weight.dtype)
    with torch.no_grad():
        try:
            theirs = norm(probe)
        except Exception:  # a norm that does not take this shape is not the one the kernel computes
            return False
        ours = ops.rms_norm(probe, weight, eps)
    if theirs.shape != ours.shape or theirs.dtype != ours.dtype:
        return False
    step = torch.finfo(weight.dtype).eps
    return torch.allclose(theirs.float(), ours.float(), rtol=2 * step, atol=1e-6)


def use_kernel_for_norms(model: torch.nn.Module, ops: DecodeOps | None) -> int:
    """Replace each RMSNorm module of `model` that the kernel reproduces; returns how many."""
    if ops is None:
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            weight = getattr(child, "weight", None)
            if (child is None or "RMSNorm" not in type(child).__name__ or list(child.children())
                    or not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.dtype not in DTYPES
                    or weight.device.type != "cpu"):
                continue
            eps = _epsilon(child)
            if eps is not None and _matches_kernel(child, ops, eps):
                parent._modules[name] = KernelRMSNorm(child, ops, eps)
                replaced += 1
    return replaced
