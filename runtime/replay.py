"""Routing replay: force each MoE layer's expert choice from a recorded trace (benchmarks on random weights).

The gate weights stay the model's own (in rank order); only the expert ids come from the trace, so that
cache behaviour under real routing can be measured on a checkpoint whose own routing is not real.
Each forward pass of T tokens takes the next T token rows of the trace, wrapping around at its end.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .contracts.traces import Trace, load_trace
from .errors import TraceError


def token_rows(trace: Trace) -> list[list[list[int]]]:
    """Every token's expert ids per MoE layer ([tokens][layers][k]), in trace order, prefill and decode."""
    return [[list(layer[t]) for layer in p.experts] for p in trace.passes for t in range(p.tokens)]


class RoutingReplay:
    def __init__(self, rows: list[list[list[int]]], num_layers: int, num_experts: int, top_k: int,
                 source: str = "trace") -> None:
        for t, row in enumerate(rows):
            if len(row) < num_layers:
                raise TraceError(f"{source}: token {t} has {len(row)} layers, the model has {num_layers} MoE layers")
            for layer, ids in enumerate(row[:num_layers]):
                if len(ids) < top_k:
                    raise TraceError(f"{source}: token {t} layer {layer} has {len(ids)} experts, "
                                     f"the model routes to {top_k}")
                if len(set(ids[:top_k])) != top_k or min(ids[:top_k]) < 0 or max(ids[:top_k]) >= num_experts:
                    raise TraceError(f"{source}: token {t} layer {layer}: experts {ids[:top_k]} are not "
                                     f"{top_k} distinct ids below {num_experts}")
        # [tokens, layers, k] as one tensor: a pass's ids are one slice
        self._ids = torch.tensor([[ids[:top_k] for ids in row[:num_layers]] for row in rows], dtype=torch.long)
        self._offsets: dict[int, int] = {}
        self._next = 0

    @classmethod
    def load(cls, path: str | Path, num_layers: int, num_experts: int, top_k: int) -> "RoutingReplay":
        """Read with the traces contract's reader (either format; a malformed file is a one-line
        `TraceError`), then check the routing against this model: a trace of a bigger model replays its
        first layers and first ranks."""
        rows = token_rows(load_trace(path))
        if not rows:
            raise TraceError(f"{path}: no routing records")
        return cls(rows, num_layers, num_experts, top_k, source=str(path))

    def ids(self, pass_index: int, layer: int, tokens: int) -> torch.Tensor:
        """The ids [tokens, k] of `layer` in pass `pass_index`, on the host: routing decisions are made there,
        and a CUDA plan then needs no copy of them to the device and back (two syncs a layer)."""
        if pass_index not in self._offsets:
            self._offsets = {pass_index: self._next}  # only the current pass is needed
            self._next += tokens
        start = self._offsets[pass_index]
        n = self._ids.shape[0]
        picks = torch.arange(start, start + tokens) % n
        return self._ids[picks, layer]
