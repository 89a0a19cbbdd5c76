"""Routing replay: force each MoE layer's expert choice from a recorded trace (benchmarks on random weights).

The gate weights stay the model's own (in rank order); only the expert ids come from the trace, so that
cache behaviour under real routing can be measured on a checkpoint whose own routing is not real.
Each forward pass of T tokens takes the next T token rows of the trace, wrapping around at its end.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import TraceError


def read_token_rows(path: str | Path) -> list[list[list[int]]]:
    """Every token's expert ids per MoE layer ([tokens][layers][k]) from either trace format."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TraceError(f"{p}: no such trace file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{p}: cannot read ({exc})") from None
    rows: list[list[list[int]]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{p}:{n}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "trace" in record:
            continue  # the header line
        try:
            if "layers" in record:  # one decode token a line
                rows.append([[int(e) for e in ids] for ids in record["layers"]])
            else:  # one forward pass a line: experts [L][T][k]
                experts = record["experts"]
                for t in range(int(record["tokens"])):
                    rows.append([[int(e) for e in layer[t]] for layer in experts])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise TraceError(f"{p}:{n}: not a routing record ({type(exc).__name__}: {exc})") from None
    if not rows:
        raise TraceError(f"{p}: no routing records")
    return rows


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
        return cls(read_token_rows(path), num_layers, num_experts, top_k, source=str(path))

    def ids(self, pass_index: int, layer: int, top_k_index: torch.Tensor) -> torch.Tensor:
        tokens = top_k_index.shape[0]
        if pass_index not in self._offsets:
            self._offsets = {pass_index: self._next}  # only the current pass is needed
            self._next += tokens
        start = self._offsets[pass_index]
        n = self._ids.shape[0]
        picks = torch.arange(start, start + tokens) % n
        return self._ids[picks, layer].to(top_k_index.device)
