"""What a MoE layer sees of the run beyond its own cache: all of it, so that it needs no engine.

- routing in: the routing replayed from a trace (benchmarks on random weights), if any;
- routing out: the trace being recorded (`run --trace-out`), if any;
- the pass counter both of them follow (the engine's `begin_pass` moves it);
- the background copies and prefetch (`Prefetcher`), and the CPU executor the layers share;
- the device seam (runtime/device.py) of a CUDA plan, through which its layers reach the accelerator
  (None with `accelerator: cpu`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .contracts.traces import TraceRecorder
from .cpu_executor import CpuExecutor
from .device import DeviceSeam
from .prefetch import Prefetcher
from .replay import RoutingReplay


@dataclass
class LayerContext:
    cpu: CpuExecutor  # computes the CPU misses, with the plan's threads
    copies: Prefetcher  # background copies into slots, pending copies, prefetch guesses
    replay: RoutingReplay | None = None  # routing forced from a trace, or None: the model's own
    recorder: TraceRecorder | None = None  # the routing trace being recorded, or None
    pass_index: int = -1  # the current forward pass, from 0
    seam: DeviceSeam | None = None  # the accelerator's calls on a CUDA plan; None with accelerator: cpu

    def begin_pass(self, phase: str, tokens: int) -> None:
        self.pass_index += 1
        if self.recorder is not None:
            self.recorder.begin_pass(self.pass_index, phase, tokens)

    def route(self, layer: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """This pass's expert ids at `layer`, [T, k] on the host (routing decisions are made there): the
        router's own, or the replayed ones; recorded with the gate weights if a trace is being recorded.
        A CUDA plan's layer passes host copies (its one sync brought them over; with a replay it brings no
        ids and reads only their shape here)."""
        if self.replay is not None:
            top_k_index = self.replay.ids(self.pass_index, layer, top_k_index.shape[0])
        idx = top_k_index if top_k_index.is_cpu else top_k_index.to("cpu")
        if self.recorder is not None:
            self.recorder.record(layer, idx.tolist(), top_k_weights.float().cpu().tolist())
        return idx
