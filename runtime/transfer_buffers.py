"""The two transfer buffers: where accelerator misses that do not enter the cache are copied to be computed.

A transfer (a miss computed on the accelerator, `miss.compute: accelerator` or `miss.transfer_min_tokens`)
that takes no cache slot (a static policy, zero slots) is copied into one of TWO buffers on the accelerator,
taken in turn, so that on a CUDA plan the copy of the next transfer runs on the copy stream while the
compute stream computes this one (`MoeLayer._transfers`). A buffer is written again only after the compute
that read it: each buffer keeps the event recorded after its last reader, and the copy into it waits for
that event on the copy stream.

One pair for all the MoE layers of a model (the memory accounting's `transfer_scratch`, two experts),
allocated on first use: layers whose experts have the same tensors share it, which every model moeplan
plans for does (`ModelShape` has one expert size); a layer with other expert tensors gets a pair of its own.
"""
from __future__ import annotations

from typing import Any

import torch

from .contracts.schedule import TRANSFER_BUFFERS as BUFFERS  # one copied into while the other is read


class TransferBuffers:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        # (shape, dtype) of each expert tensor -> BUFFERS lists of tensors of those shapes
        self._pairs: dict[tuple, list[list[torch.Tensor]]] = {}
        # per buffer: the event after the last compute queued that reads it (None: never read)
        self.last_read: list[Any] = [None] * BUFFERS
        self._next = 0

    def take(self) -> int:
        """The buffer the next transfer goes to: the two in turn, across layers and passes, so that the one
        just read is the one written last."""
        buffer = self._next
        self._next = (buffer + 1) % BUFFERS
        return buffer

    def tensors(self, buffer: int, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """Buffer `buffer` as one tensor per expert tensor in `like` (one expert's host views)."""
        key = tuple((tuple(t.shape), t.dtype) for t in like)
        pair = self._pairs.get(key)
        if pair is None:
            pair = self._pairs[key] = [[torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in like]
                                       for _ in range(BUFFERS)]
        return pair[buffer]

    def allocated_bytes(self) -> int:
        """The bytes of every buffer allocated so far (the accounting's `transfer_scratch` promises them)."""
        return sum(t.numel() * t.element_size() for pair in self._pairs.values() for buf in pair for t in buf)
