"""The growing KV cache layer holds what transformers' DynamicLayer holds, through growth, crop and reset."""
from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from model_factory import make_config
from runtime.kv_cache import GrowingLayer, use_growing_layers


def _step(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, tokens, 8, generator=g), torch.randn(1, 2, tokens, 8, generator=g)


def test_growing_layer_equals_dynamic_layer():
    ours, theirs = GrowingLayer(), DynamicLayer()
    steps = [37] + [1] * 40 + [5]  # a prefill, then decode steps past the first capacity (64) and its double
    for i, tokens in enumerate(steps):
        k, v = _step(tokens, i)
        ko, vo = ours.update(k, v)
        kt, vt = theirs.update(k, v)
        assert torch.equal(ko, kt) and torch.equal(vo, vt)
        assert ours.get_seq_length() == theirs.get_seq_length()
    ours.crop(-3)
    theirs.crop(-3)
    k, v = _step(2, 99)
    assert torch.equal(ours.update(k, v)[0], theirs.update(k, v)[0])
    ours.batch_select_indices(torch.tensor([0]))  # a new tensor, no longer a view of the buffer
    theirs.batch_select_indices(torch.tensor([0]))
    k, v = _step(1, 100)
    assert torch.equal(ours.update(k, v)[1], theirs.update(k, v)[1])
    ours.reset()
    assert ours.get_seq_length() == 0
    k, v = _step(3, 101)
    assert torch.equal(ours.update(k, v)[0], k)


def test_only_plain_dynamic_layers_are_swapped():
    config = make_config("mixtral")
    cache = DynamicCache(config=config)
    assert use_growing_layers(cache) == config.num_hidden_layers
    assert all(type(layer) is GrowingLayer for layer in cache.layers)
    config.sliding_window = 16
    cache = DynamicCache(config=config)
    assert use_growing_layers(cache) == 0
    assert all(isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers)
