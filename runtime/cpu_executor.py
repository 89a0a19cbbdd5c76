"""Compute missed experts on CPU threads, from the experts' host memory.

The activations come over from the accelerator once per layer (a few KB per token), the expert weights
never move: for a decode token, streaming an expert from DRAM beats copying it over PCIe.
"""
from __future__ import annotations

import torch

from .expert_math import module_expert_ffn
from .expert_store import ExpertStore

Job = tuple[torch.Tensor, torch.Tensor, int]  # (token indices, rank positions, expert id)


class CpuExecutor:
    def __init__(self, threads: int) -> None:
        self.threads = threads

    def run(self, module: torch.nn.Module, store: ExpertStore, x: torch.Tensor, top_k_weights: torch.Tensor,
            jobs: list[Job]) -> torch.Tensor:
        """The weighted sum of the given experts' outputs, [T, H] float32 on the CPU."""
        x_cpu = x.to("cpu")
        w_cpu = top_k_weights.to("cpu")
        out = torch.zeros(x_cpu.shape, dtype=torch.float32)
        for tokens, ranks, expert in jobs:
            y = module_expert_ffn(module, x_cpu[tokens], *store.weights_args(store.host_weights(expert)))
            out.index_add_(0, tokens, (y * w_cpu[tokens, ranks, None]).float())
        return out
