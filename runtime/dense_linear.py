"""Dense projections on the CPU at decode: the same GEMV kernel as the missed experts.

With `accelerator: cpu` the dense part (attention projections, lm_head) runs on the CPU too, and at one
token torch's bf16 matmul streams its weights at about half the DRAM rate (bench/results/cpu_kernel_avx512.md, cpu_kernel_avx2_run2.md).
Each `nn.Linear` outside the experts is replaced by a `KernelLinear` that holds the same parameters and
uses the kernel where it is measured faster (few rows), torch's matmul otherwise. Module replacement,
as quantisation libraries do it: no modeling code is copied or patched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import GemvKernel


class KernelLinear(torch.nn.Linear):
    def __init__(self, linear: torch.nn.Linear, kernel: GemvKernel, threads: int) -> None:
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # shared, not copied
        # Plain aliases of the same parameter objects for the one-token path: reading a parameter as a
        # module attribute goes through Module.__getattr__, about 1 µs each on the AVX2 development machine.
        vars(self)["_weight"], vars(self)["_bias"] = linear.weight, linear.bias
        self.kernel = kernel
        self.set_threads(threads)

    def set_threads(self, threads: int) -> None:
        self.threads = threads
        # Decided once, not per call: a decode token makes some thirty of these calls, and on the AVX2
        # development machine each Python check or attribute lookup of a module costs about 1 µs.
        w = self._weight
        self._one_token = self.kernel.one_token(w) if self.kernel.handles(w.dtype, 1, threads) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        one_token = self._one_token
        w = self._weight
        if one_token is not None and x.numel() == self.in_features and x.dtype is w.dtype and x.is_cpu \
                and x.is_contiguous() and w.is_contiguous():
            # the output rounded to x's dtype inside the kernel, like torch's own bf16 matmul output
            y = torch.empty((*x.shape[:-1], self.out_features), dtype=x.dtype)
            one_token(x, y, self.threads)
            return y if self._bias is None else y + self._bias
        rows = x.numel() // self.in_features
        if x.dtype != w.dtype or not x.is_cpu or not self.kernel.handles(w.dtype, rows, self.threads):
            return F.linear(x, w, self.bias)
        return self._kernel(x, x.reshape(rows, self.in_features))

    def _kernel(self, x: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype != w.dtype or not w.is_contiguous():
            return F.linear(x, w, self.bias)
        # the output rounded to x's dtype inside the kernel, like torch's own bf16 matmul output
        y = self.kernel.linear(w, x2d.contiguous(), self.threads, x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def use_kernel_for_dense(model: torch.nn.Module, skip: list[torch.nn.Module], kernel: GemvKernel | None,
                         threads: int) -> int:
    """Replace every plain `nn.Linear` of `model` outside the `skip` modules; returns how many."""
    if kernel is None:
        return 0
    skipped = {id(m) for root in skip for m in root.modules()}
    replaced = 0
    for parent in list(model.modules()):
        if id(parent) in skipped:
            continue
        for name, child in list(parent._modules.items()):
            if type(child) is torch.nn.Linear and id(child) not in skipped:
                parent._modules[name] = KernelLinear(child, kernel, threads)
                replaced += 1
    return replaced
