"""A layer's int8/int4 experts in memory, attached to transformers' experts module, and the scratch they
dequantize into.

A quantized experts module keeps no float expert weights: its `gate_up_proj`/`down_proj` (or `up_proj`)
parameters are removed and a `QuantizedExperts` takes their place as the attribute `ATTRIBUTE`, holding
for each projection P `qweight` [E, N, K] int8 or [E, N, K/2] uint8 and `scales` [E, N, K/G] float16
(runtime/contracts/expert_format.py), each expert the contiguous slice [e]. Matrices are kept in the
standard layout ([N outputs, K inputs]) whatever the module's `is_transposed` says: a transposed module's
weights are transposed once, when they are quantized. Biases stay the module's float parameters.

Hits and misses computed through torch dequantize one expert at a time into a `DequantScratch` in the
model dtype: one expert's matrices per device, shared by every layer (computation is ordered: on CUDA by
the stream, on the CPU by the one thread that runs the layers).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from . import huge_pages
from .contracts.expert_format import check_group_size, qweight_columns
from .errors import ModelError
from .expert_math import in_proj_name
from .quant_format import dequantize, quantize

ATTRIBUTE = "moeplan_quantized"


@dataclass
class QuantizedExperts:
    fmt: str  # int8 | int4
    group_size: int
    projections: tuple[str, ...]  # the module's weight names in order: (in projection, "down_proj")
    qweight: dict[str, torch.Tensor]  # projection -> [E, N, K] int8 or [E, N, K/2] uint8
    scales: dict[str, torch.Tensor]  # projection -> [E, N, K/G] float16

    @property
    def num_experts(self) -> int:
        return self.qweight[self.projections[0]].shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """qweight and scales of each projection, in order: what a cache slot holds per expert."""
        return [t for p in self.projections for t in (self.qweight[p], self.scales[p])]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def quantized_of(module: torch.nn.Module) -> QuantizedExperts | None:
    """The module's quantized experts, or None for float experts."""
    return getattr(module, ATTRIBUTE, None)


def projection_names(module: torch.nn.Module) -> tuple[str, str]:
    return in_proj_name(module), "down_proj"


def attach(module: torch.nn.Module, quantized: QuantizedExperts) -> None:
    """Put `quantized` in place of the module's float expert weights (which are dropped)."""
    for name in quantized.projections:
        module._parameters.pop(name, None)
        module.__dict__.pop(name, None)
    setattr(module, ATTRIBUTE, quantized)


def quantize_module(module: torch.nn.Module, fmt: str, group_size: int, where: str) -> None:
    """Quantize the module's float expert weights in place of them (quantize-at-load), projection by
    projection, so that the float and the quantized copies of one projection are all that coexist."""
    names = projection_names(module)
    qweight, scales = {}, {}
    for name in names:
        w = getattr(module, name).data
        if getattr(module, "is_transposed", False):  # stored [E, K, N]: quantize the standard [E, N, K]
            w = w.transpose(1, 2)
        problem = check_group_size(group_size, w.shape[-1])
        if problem:
            raise ModelError(f"{where}: {name}: group size {problem}; quantize the checkpoint with "
                             f"`moeplan quantize --group-size N` for a group size that divides it")
        # expert by expert, into the layer's tensors: the float32 working copies stay one expert's
        experts, rows, inputs = w.shape
        qweight[name] = huge_pages.empty((experts, rows, qweight_columns(fmt, inputs)),
                                         torch.int8 if fmt == "int8" else torch.uint8)
        scales[name] = huge_pages.empty((experts, rows, inputs // group_size), torch.float16)
        for e in range(experts):
            qweight[name][e], scales[name][e] = quantize(w[e], fmt, group_size)
        del w
        module._parameters.pop(name, None)  # frees the float weights, unless something else holds them
    setattr(module, ATTRIBUTE, QuantizedExperts(fmt, group_size, names, qweight, scales))


def quantize_at_load(modules: list[torch.nn.Module], fmt: str, group_size: int, folder: str,
                     report=print) -> float:
    """Quantize every layer's experts, layer by layer; returns the seconds it took (and reports them)."""
    start = time.perf_counter()
    report(f"moeplan: quantizing the routed experts of {folder} to {fmt} (group size {group_size}) while "
           f"loading, layer by layer")
    for i, module in enumerate(modules):
        quantize_module(module, fmt, group_size, f"{folder}: MoE layer {i}")
    seconds = time.perf_counter() - start
    report(f"moeplan: quantized {len(modules)} MoE layers' experts to {fmt} in {seconds:.2f} s")
    return seconds


class DequantScratch:
    """One expert's matrices in the model dtype, per device, reused by every layer's dequantization."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, int], torch.Tensor] = {}

    def matrix(self, index: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Buffer `index` (0: input projection, 1: output projection) as a [rows, cols] matrix of `dtype`."""
        key = (device, index)
        need = rows * cols
        buf = self._buffers.get(key)
        if buf is None or buf.dtype != dtype or buf.numel() < need:
            buf = self._buffers[key] = torch.empty(need, dtype=dtype, device=device)
        return buf[:need].view(rows, cols)

    def dequantize(self, index: int, qweight: torch.Tensor, scales: torch.Tensor, fmt: str,
                   dtype: torch.dtype) -> torch.Tensor:
        """One expert matrix (qweight [N, K'] and scales [N, K/G] on one device) in `dtype`, in buffer `index`."""
        cols = qweight.shape[-1] * (1 if fmt == "int8" else 2)
        out = self.matrix(index, qweight.shape[0], cols, dtype, qweight.device)
        return dequantize(qweight, scales, fmt, dtype, out=out)
