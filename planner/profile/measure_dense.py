"""Timing of the dense part of one decoder layer (norms, attention with a KV cache, router), on any device.

The layer is transformers' own `MixtralDecoderLayer`, built from a `MixtralConfig` with the model's
hidden size and attention shape, so the profile measures the code the runtime runs; on the CPU with the
runtime's CPU decode path in place (kernel projections, C norms and attention, the in-place KV cache:
runtime/cpu_decode.py), as `accelerator: cpu` runs it. Its experts are replaced by a module that returns
zeros: in the runtime, moeplan's experts hook does that work, and its cost is measured separately
(`expert_ffn`, `expert_overhead_s`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .measure import TORCH_DTYPES, Timing, time_call


@dataclass(frozen=True)
class LayerShape:
    """The shape of one MoE decoder layer, as far as the profiler times it."""
    name: str
    hidden: int
    intermediate: int  # of one routed expert
    heads: int
    kv_heads: int
    head_dim: int
    num_experts: int  # router width


class _NoExperts(torch.nn.Module):
    """Stands in for the experts: the runtime's hook computes them, and they are timed on their own."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


class DenseLayerBench:
    """One decoder layer without experts, in `dtype` on `device`, ready to time at any context."""

    def __init__(self, shape: LayerShape, dtype: str, device: torch.device | str) -> None:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralRotaryEmbedding

        self.shape, self.device, self.dtype = shape, torch.device(device), TORCH_DTYPES[dtype]
        config = MixtralConfig(hidden_size=shape.hidden, intermediate_size=1, num_hidden_layers=1,
                               num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                               head_dim=shape.head_dim, num_local_experts=shape.num_experts,
                               num_experts_per_tok=min(2, shape.num_experts), sliding_window=None,
                               vocab_size=8, max_position_embeddings=1 << 16)
        config._attn_implementation = "sdpa"  # what from_pretrained picks on CPU and CUDA
        gen = torch.Generator().manual_seed(0)
        layer = MixtralDecoderLayer(config, layer_idx=0)
        layer.mlp.experts = _NoExperts()
        with torch.no_grad():
            for name, p in layer.named_parameters():
                # Parameters start uninitialised (torch.empty); norms 1, projections small and random.
                p.copy_(torch.ones_like(p) if "layernorm" in name else torch.randn(p.shape, generator=gen) * 0.02)
        self.layer = layer.to(device=self.device, dtype=self.dtype).eval()
        self.rotary = MixtralRotaryEmbedding(config).to(self.device)
        self.config = config
        if self.device.type == "cpu":
            from runtime.cpu_decode import use_cpu_decode_path
            from runtime.kernels import load

            use_cpu_decode_path(self.layer, [], load(), torch.get_num_threads())

    def time(self, tokens: int, context: int, *, warmup: int, repeats: int, min_seconds: float = 0.0,
             flush: Callable[[], object] | None = None, sync: Callable[[], object] | None = None) -> Timing:
        """Time of the layer on `tokens` new tokens after `context - tokens` cached positions.

        Untimed before each repeat: a fresh KV cache holding the earlier positions, and `flush` (evict
        caches, so weights and KV come from memory as they do in a model larger than the cache).
        """
        from transformers import DynamicCache

        from runtime.cpu_decode import set_kernel_threads
        from runtime.kv_cache import use_growing_layers

        if not 1 <= tokens <= context:
            raise ValueError(f"tokens must be in 1..context, got tokens {tokens}, context {context}")
        s = self.shape
        past = context - tokens
        gen = torch.Generator().manual_seed(2)
        k0 = torch.randn(1, s.kv_heads, past, s.head_dim, generator=gen).to(self.device, self.dtype)
        v0 = torch.randn(1, s.kv_heads, past, s.head_dim, generator=gen).to(self.device, self.dtype)
        x = (torch.randn(1, tokens, s.hidden, generator=gen) * 0.1).to(self.device, self.dtype)
        position_ids = torch.arange(past, context, device=self.device)[None]
        # Rotary tables are computed once per forward pass for all layers: not this layer's cost.
        position_embeddings = self.rotary(x, position_ids)
        state: dict[str, object] = {}

        set_kernel_threads(self.layer, torch.get_num_threads())  # the caller's thread count for this timing

        def before() -> None:
            cache = DynamicCache(config=self.config)
            if self.device.type == "cpu":
                use_growing_layers(cache)
            if past:
                cache.update(k0, v0, 0)
            state["cache"] = cache
            if flush is not None:
                flush()

        def call() -> None:
            self.layer(x, position_embeddings=position_embeddings, attention_mask=None,
                       position_ids=position_ids, cache=state["cache"])

        with torch.inference_mode():
            return time_call(call, warmup=warmup, repeats=repeats, min_seconds=min_seconds, before=before,
                             sync=sync)
