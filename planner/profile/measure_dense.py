"""Timing of the dense part of one decoder layer (norms, attention with a KV cache, router), on any device.

The layer is transformers' own `MixtralDecoderLayer`, built from a `MixtralConfig` with the model's
hidden size and attention shape, so the profile measures the code the runtime runs; on the CPU with the
runtime's CPU decode path in place (kernel projections, C norms and attention, the in-place KV cache:
runtime/cpu_decode.py), as `accelerator: cpu` runs it. Its experts are replaced by a module that returns
zeros: in the runtime, moeplan's experts hook does that work, and its cost is measured separately
(`moe_layer`, `expert_ffn`, `expert_overhead_s`). The rest of a decode step (embedding, final norm,
lm_head, picking the token) is timed by `DecodeStepBench`. What runs before each repeat is the caller's
`flush`: the profiler passes what a decode step runs in between (measure_moe.py), warm or cold.
"""
from __future__ import annotations

import time
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
    top_k: int = 0  # experts each token chooses (the MoE layer timings call this many); 0: min(2, num_experts)
    vocab: int = 0  # vocabulary (the lm_head of the decode step timing); 0: no decode step timing

    @property
    def experts_per_token(self) -> int:
        return self.top_k or min(2, self.num_experts)


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
                               num_experts_per_tok=shape.experts_per_token, sliding_window=None,
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

        Untimed before each repeat: a fresh KV cache holding the earlier positions, and `flush` (what runs
        between two calls of the layer in a decode step; a full eviction of the caches for weights and KV
        read from memory, as in a model larger than the cache).
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


class _CacheOnlyLayer(torch.nn.Module):
    """Stands in for a decoder layer in the decode step timing: appends one position to the KV cache (so
    the step sees a cache that grows, as in a run) and returns its input; the time spent in it is the
    layer's, not the step's, and is taken off."""

    def __init__(self, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.seconds = 0.0  # time spent in here since the caller last reset it

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        start = time.perf_counter()
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            kv = hidden_states.new_zeros(1, self.kv_heads, hidden_states.shape[1], self.head_dim)
            cache.update(kv, kv, 0)
        self.seconds += time.perf_counter() - start
        return hidden_states


class DecodeStepBench:
    """The part of a decode step outside the decoder layers, as the runtime's generation loop runs it:
    transformers' `MixtralForCausalLM` (token embedding, rotary tables, attention mask, final norm, the
    lm_head on the last position) with the runtime's CPU decode path in place on the CPU, and the runtime's
    greedy `Sampler` picking the next token. Its one decoder layer only grows the KV cache
    (`_CacheOnlyLayer`), and its time is not counted."""

    def __init__(self, shape: LayerShape, dtype: str, device: torch.device | str) -> None:
        from transformers import MixtralConfig, MixtralForCausalLM

        from runtime.sampling import Sampler

        if shape.vocab < 1:
            raise ValueError(f"shape {shape.name}: no vocabulary size, so no decode step to time")
        self.shape, self.device, self.dtype = shape, torch.device(device), TORCH_DTYPES[dtype]
        config = MixtralConfig(hidden_size=shape.hidden, intermediate_size=1, num_hidden_layers=1,
                               num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                               head_dim=shape.head_dim, num_local_experts=shape.num_experts,
                               num_experts_per_tok=shape.experts_per_token, sliding_window=None,
                               vocab_size=shape.vocab, max_position_embeddings=1 << 16, tie_word_embeddings=False)
        config._attn_implementation = "sdpa"
        gen = torch.Generator().manual_seed(0)
        model = MixtralForCausalLM(config)
        self.layer = _CacheOnlyLayer(shape.kv_heads, shape.head_dim)
        model.model.layers[0] = self.layer
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=gen) * 0.02)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.config = config
        self.sampler = Sampler(0.0, 1.0, 0)
        if self.device.type == "cpu":
            from runtime.cpu_decode import use_cpu_decode_path
            from runtime.kernels import load

            use_cpu_decode_path(self.model, [], load(), torch.get_num_threads())

    def time(self, context: int, *, warmup: int, repeats: int, min_seconds: float = 0.0,
             flush: Callable[[], object] | None = None, sync: Callable[[], object] | None = None) -> Timing:
        """Time of one decode step outside the layers after `context` cached positions, with the thread
        count the caller set; `flush` runs untimed before each repeat (what the layers do in between)."""
        import inspect

        from transformers import DynamicCache

        from runtime.cpu_decode import set_kernel_threads
        from runtime.kv_cache import use_growing_layers

        set_kernel_threads(self.model, torch.get_num_threads())
        cache = DynamicCache(config=self.config)
        if self.device.type == "cpu":
            use_growing_layers(cache)
        # the name this version of transformers gives the cache argument, as the runtime's session looks it up
        kwargs = {"use_cache": True, "logits_to_keep": 1,
                  "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values": cache}
        state = {"input": torch.tensor([[3] * max(1, context)], device=self.device)}
        layer = self.layer

        def before() -> None:
            if flush is not None:
                flush()
            layer.seconds = 0.0

        def call() -> None:
            logits = self.model(input_ids=state["input"], **kwargs).logits[0, -1]
            token = self.sampler.pick(logits)
            state["input"] = torch.tensor([[token]], device=self.device)

        with torch.inference_mode():
            call()  # the prompt: `context` positions into the cache, untimed
            return time_call(call, warmup=warmup, repeats=repeats, min_seconds=min_seconds, before=before, sync=sync,
                             exclude=lambda: layer.seconds)
