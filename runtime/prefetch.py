"""Background copies into the MoE layers' slots, and prefetch: guessing a layer's experts one layer early.

One object owns what spans layers, so that no layer reaches into another:
- the copy stream (through the device seam, runtime/device.py): promotions and prefetch copies run on
  it, each after the reads already queued on the compute stream, so a slot is never overwritten while a
  kernel still reads it;
- each layer's latest pending copy (an event): a layer waits only for copies into its own slots, at its
  next start (the CUDA execution order, step 5);
- the guesses made for each layer's current pass, which that layer counts when it starts.
With `accelerator: cpu` there is no seam: a copy is an ordinary memory copy and nothing is pending.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .contracts.cache_policy import LayerCachePolicy, admit_guesses
from .device import DeviceSeam
from .expert_store import ExpertStore


class Prefetcher:
    def __init__(self, seam: DeviceSeam | None, num_layers: int, top_k: int) -> None:
        self.seam = seam
        self.top_k = top_k  # experts a token chooses per layer: how many guesses per token
        self._pending: list[Any] = [None] * num_layers
        self._guesses: list[frozenset[int]] = [frozenset()] * num_layers

    def copy(self, layer: int, store: ExpertStore, copies: list[tuple[int, int]], what: str = "promote") -> int:
        """Copy (expert, slot) pairs into `layer`'s slots in the background; returns the bytes copied."""
        if self.seam is None:  # accelerator: cpu
            return sum(store.copy_to_slot(expert, slot) for expert, slot in copies)
        pairs = [pair for expert, slot in copies for pair in store.slot_copies(expert, slot)]
        event, copied = self.seam.background_copies(layer, what, pairs)
        self._pending[layer] = event
        return copied

    def wait(self, layer: int) -> None:
        """Make the compute stream wait for the copies into `layer`'s slots (a layer's start)."""
        event = self._pending[layer]
        if event is not None:
            self.seam.wait(layer, event)
            self._pending[layer] = None

    def take_guesses(self, layer: int) -> frozenset[int]:
        """The experts guessed for `layer`'s current pass (empty if none), forgotten once taken."""
        guesses = self._guesses[layer]
        self._guesses[layer] = frozenset()
        return guesses

    def guess(self, x: torch.Tensor, router_weight: torch.Tensor) -> frozenset[int]:
        """A layer's experts for this pass, guessed by running its router on the previous layer's hidden
        states x [T, H]: each token's top-k. On a CUDA plan x and the weight are host copies, so that the
        guess needs no sync of its own."""
        logits = F.linear(x, router_weight.to(x.dtype))  # [T, E]
        return frozenset(torch.topk(logits, self.top_k, dim=-1).indices.flatten().tolist())

    def prefetch(self, guesses: frozenset[int], layer: int, policy: LayerCachePolicy,
                 store: ExpertStore) -> tuple[int, int]:
        """Admit `layer`'s guesses for this pass into its cache and start copying the ones not resident;
        returns (copies started, bytes)."""
        self._guesses[layer] = guesses
        copies = admit_guesses(policy, guesses)
        return len(copies), (self.copy(layer, store, copies, f"prefetch for {layer}") if copies else 0)
