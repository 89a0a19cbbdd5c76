"""Dense projections on the CPU at decode: the same GEMV kernel as the missed experts.

With `accelerator: cpu` the dense part (attention projections, lm_head) runs on the CPU too, and at one
token torch's bf16 matmul streams its weights at about half the DRAM rate (bench/results/cpu_kernel_avx512.md, cpu_kernel_avx2.md).
Each `nn.Linear` outside the experts is replaced by a `KernelLinear` that holds the same parameters and
uses the kernel where it is measured faster (few rows), torch's matmul otherwise. Module replacement,
as quantisation libraries do it: no modeling code is copied or patched.

Projections that read the same input (a layer's q, k and v; a dense MLP's gate and up) share one weight
buffer, and the first of them called computes all in one kernel call, handing the others their output
when they are called with an equal input. Why: on the AVX2 development machine the 1-2 MB q, k and v
calls streamed at 8.5-10 GB/s against 14-15 for the experts' 44 MB calls, a cost per call (the call,
waking the threads, the prefetchers' ramp); grouping takes a decode token from 41 kernel calls to 25.
Measured side by side in one process, the whole token did not change beyond that machine's noise
(39.95 against 40.04 ms).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import GemvKernel

# sibling projections that transformers' modeling code applies to one input tensor
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInput:
    """Sibling projections' weights stacked in one buffer, and the outputs computed for the latest input."""

    def __init__(self, members: list["KernelLinear"]) -> None:
        self.members = members
        self.weight = torch.cat([m.weight.detach() for m in members])  # [sum of N, K], contiguous
        start = 0
        for m in members:  # each member's weight becomes its rows of the shared buffer: no second copy
            m.weight.data = self.weight[start:start + m.out_features]
            m.group = self
            start += m.out_features
        self._widths = [m.out_features for m in members]
        # one token: the buffer is read through the first member's parameter, which starts it and follows
        # a move of the members together (runtime/huge_pages.py)
        self._one_token = members[0].kernel.one_token(_StackedRows(members[0].weight, start))
        # a copy of the latest input: an output is handed out only for an input equal to it, whatever
        # tensor carries it (inference tensors have no version counter to tell an in-place change)
        self._input: torch.Tensor | None = None
        self._outputs: dict[int, torch.Tensor] = {}  # id(member) -> its output, not yet asked for

    def output(self, member: "KernelLinear", x: torch.Tensor, one_token: bool) -> torch.Tensor:
        """The member's output for x (contiguous, the weights' dtype): [..., N] for one token (x of any
        leading dimensions of size 1), [T, N] for x2d [T, K]."""
        ready = self._outputs.pop(id(member), None)
        if ready is not None and torch.equal(self._input, x):  # False for another shape too
            return ready
        if one_token:
            both = torch.empty((*x.shape[:-1], len(self.weight)), dtype=x.dtype)
            self._one_token(x, both, member.threads)
            parts = both.split(self._widths, -1)  # contiguous: every dimension but the last has size 1
        else:
            first = self.members[0].weight
            if first.data_ptr() != self.weight.data_ptr():  # the members were moved together (huge_pages.py)
                self.weight = torch.empty(0, dtype=first.dtype).set_(first.untyped_storage(), first.storage_offset(),
                                                                      self.weight.shape, self.weight.stride())
            both = member.kernel.linear(self.weight, x, member.threads, x.dtype)  # [T, sum of N]
            parts = [part.contiguous() for part in both.split(self._widths, -1)]
        outputs = {id(m): part for m, part in zip(self.members, parts)}
        mine = outputs.pop(id(member))
        self._input, self._outputs = x.clone(), outputs
        return mine


class _StackedRows:
    """The shape and dtype of a group's stacked weights, and the data pointer of its first member's (the
    start of the stack): what `GemvKernel.one_token` reads off a weight."""

    def __init__(self, first: torch.Tensor, rows: int) -> None:
        self._first = first
        self.shape = (rows, first.shape[1])
        self.dtype = first.dtype

    def data_ptr(self) -> int:
        return self._first.data_ptr()


class KernelLinear(torch.nn.Linear):
    def __init__(self, linear: torch.nn.Linear, kernel: GemvKernel, threads: int) -> None:
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # shared, not copied
        # Plain aliases of the same parameter objects for the one-token path: reading a parameter as a
        # module attribute goes through Module.__getattr__, about 1 µs each on the AVX2 development machine.
        vars(self)["_weight"], vars(self)["_bias"] = linear.weight, linear.bias
        self.kernel = kernel
        self.group: SharedInput | None = None
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
            group = self.group
            if group is not None:
                y = group.output(self, x, one_token=True)
            else:
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
        if self.group is not None and x2d.is_contiguous():
            y = self.group.output(self, x2d, one_token=False)
        else:
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
        for names in SHARED_INPUT_GROUPS:
            members = [parent._modules.get(name) for name in names]
            if all(isinstance(m, KernelLinear) for m in members) and len({m.in_features for m in members}) == 1 \
                    and len({m.weight.dtype for m in members}) == 1 and kernel.supports(members[0].weight.dtype):
                SharedInput(members)
    return replaced
