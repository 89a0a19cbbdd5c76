"""A KV cache that appends in place, for the CPU decode loop.

transformers' `DynamicLayer` appends a token with `torch.cat`, copying the whole cache of the layer at every
step (on the AVX2 development machine about 30 µs per call, two calls per layer per token, growing with the
context). `GrowingLayer` keeps each layer's keys and values in a buffer with spare room, doubling it when
full, and hands out views of the filled part: the same tensors, without the copy. Sliding-window and other
special layers keep their own class.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        if not self._owns_views() or needed > self._key_buffer.shape[-2]:
            self._regrow(length, needed, key_states, value_states)
        self._key_buffer[..., length:needed, :].copy_(key_states)
        self._value_buffer[..., length:needed, :].copy_(value_states)
        self.keys = self._key_buffer[..., :needed, :]
        self.values = self._value_buffer[..., :needed, :]
        return self.keys, self.values

    def _owns_views(self) -> bool:
        """Whether keys and values are still views of this layer's buffers (crop keeps them so; the
        batch reorderings of beam search replace them with new tensors)."""
        if self._key_buffer is None:
            return False
        return (self.keys.numel() == 0 or self.keys.data_ptr() == self._key_buffer.data_ptr()) and \
            (self.values.numel() == 0 or self.values.data_ptr() == self._value_buffer.data_ptr())

    def _regrow(self, length: int, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        capacity = max(needed, 2 * length, 64)
        buffers = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            shape = (*new.shape[:-2], capacity, new.shape[-1])
            buffer = torch.empty(shape, dtype=new.dtype, device=new.device)
            if length:
                buffer[..., :length, :].copy_(old)
            buffers.append(buffer)
        self._key_buffer, self._value_buffer = buffers

    def reset(self) -> None:
        super().reset()
        self._key_buffer = self._value_buffer = None


def use_growing_layers(cache: Any) -> int:
    """Swap each plain `DynamicLayer` of a freshly made `DynamicCache` for a `GrowingLayer`; returns how many."""
    layers = getattr(cache, "layers", None) or []
    swapped = 0
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and not layer.is_initialized:
            layers[i] = GrowingLayer()
            swapped += 1
    return swapped
