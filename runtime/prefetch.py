"""Background copies into the MoE layers' slots, and prefetch: guessing a layer's experts one layer early.

One object owns what spans layers, so that no layer reaches into another:
- the CUDA copy stream: promotions and prefetch copies run on it, each after the reads already queued on
  the compute stream, so a slot is never overwritten while a kernel still reads it;
- each layer's latest pending copy (a CUDA event): a layer waits only for copies into its own slots, at
  its next start (the CUDA execution order, step 5);
- the guesses made for each layer's current pass, which that layer counts when it starts.
With `accelerator: cpu` a copy is an ordinary memory copy and nothing is pending.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .contracts.cache_policy import LayerCachePolicy, admit_guesses
from .expert_store import ExpertStore


class Prefetcher:
    def __init__(self, device: torch.device, num_layers: int, top_k: int) -> None:
        self.device = device
        self.top_k = top_k  # experts a token chooses per layer: how many guesses per token
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: list[torch.cuda.Event | None] = [None] * num_layers
        self._guesses: list[frozenset[int]] = [frozenset()] * num_layers

    def copy(self, layer: int, store: ExpertStore, copies: list[tuple[int, int]]) -> int:
        """Copy (expert, slot) pairs into `layer`'s slots in the background; returns the bytes copied."""
        if self.stream is None:  # accelerator: cpu
            return sum(store.copy_to_slot(expert, slot) for expert, slot in copies)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        copied = 0
        with torch.cuda.stream(self.stream):
            for expert, slot in copies:
                copied += store.copy_to_slot(expert, slot)
            event = torch.cuda.Event()
            event.record(self.stream)
        self._pending[layer] = event
        return copied

    def wait(self, layer: int) -> None:
        """Make the compute stream wait for the copies into `layer`'s slots (a layer's start)."""
        event = self._pending[layer]
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            self._pending[layer] = None

    def take_guesses(self, layer: int) -> frozenset[int]:
        """The experts guessed for `layer`'s current pass (empty if none), forgotten once taken."""
        guesses = self._guesses[layer]
        self._guesses[layer] = frozenset()
        return guesses

    def guess(self, x: torch.Tensor, router: torch.nn.Module) -> frozenset[int]:
        """A layer's experts for this pass, guessed by running its router on the previous layer's hidden
        states x [T, H]: each token's top-k."""
        logits = F.linear(x, router.weight.to(x.dtype))  # [T, E]
        return frozenset(torch.topk(logits, self.top_k, dim=-1).indices.flatten().tolist())

    def prefetch(self, guesses: frozenset[int], layer: int, policy: LayerCachePolicy,
                 store: ExpertStore) -> tuple[int, int]:
        """Admit `layer`'s guesses for this pass into its cache and start copying the ones not resident;
        returns (copies started, bytes)."""
        self._guesses[layer] = guesses
        copies = admit_guesses(policy, guesses)
        return len(copies), (self.copy(layer, store, copies) if copies else 0)
