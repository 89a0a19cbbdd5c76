"""Timing of the dense part of one decoder layer (norms, attention with a KV cache, router), on any device.

The layer is transformers' own `MixtralDecoderLayer`, built from a `MixtralConfig` with the model's
hidden size and attention shape, so the profile measures the code the runtime runs; on the CPU with the
runtime's CPU decode path in place (kernel projections, C norms and attention, the in-place KV cache:
runtime/cpu_decode.py), as `accelerator: cpu` runs it. Its experts are replaced by a module that returns
zeros: in the runtime, moeplan's experts hook does that work, and its cost is measured separately
(`moe_layer`, `expert_ffn`, `expert_overhead_s`). The rest of a decode step (the runtime's generation
loop around the layers: embedding, final norm, lm_head, picking the token) is timed by `DecodeStepBench`. What runs before each repeat is the caller's
`flush`: the profiler passes what a decode step runs in between (measure_moe.py), warm or cold.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .measure import TORCH_DTYPES, Timing, summarize, time_call


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


class _TimedLayer(torch.nn.Module):
    """Wraps the decoder layer of the decode step timing: its time, and that of the caller's `flush` after it
    (what the rest of a decode step's layers do to the caches), is counted here and taken off the step."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.flush: Callable[[], object] | None = None
        self.seconds = 0.0  # time spent in here since the caller last reset it
        self.layer_seconds = 0.0  # of which in the layer itself (not the flush)

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.around(0, lambda: self.layer(*args, **kwargs))

    def around(self, index: int, run: Callable[[], object]) -> object:
        """`run()`, the layer (the native decode step's or transformers'), timed, then the flush."""
        start = time.perf_counter()
        out = run()
        done = time.perf_counter()
        if self.flush is not None:
            self.flush()
        self.layer_seconds += done - start
        self.seconds += time.perf_counter() - start
        return out


class DecodeStepBench:
    """The part of a decode step outside the decoder layers, as the runtime runs it: the runtime's own
    generation loop (`runtime.session.Session.stream`: the pass begun, transformers' `MixtralForCausalLM`
    forward with token embedding, rotary tables, attention mask, final norm and the lm_head on the last
    position, the runtime's sampler picking the token, the token handed out) on a model of the shape built
    in memory and run by the runtime's engine on the CPU (an `accelerator: cpu` plan without slots). Its one
    decoder layer is the real thing, dense part and experts (the shape's top-k of them, through the
    runtime's experts hook), so that the step runs among what a layer leaves in the caches; its time, and
    the caller's `flush` after it, is taken off. Whatever the runtime adds per token, or saves, shows here."""

    def __init__(self, shape: LayerShape, dtype: str, device: torch.device | str) -> None:
        if shape.vocab < 1:
            raise ValueError(f"shape {shape.name}: no vocabulary size, so no decode step to time")
        if torch.device(device).type != "cpu":
            raise ValueError(f"the decode step is timed on the CPU (an `accelerator: cpu` plan), not {device}")
        self.shape, self.dtype = shape, dtype
        self._sessions: dict[int, tuple[object, _TimedLayer]] = {}  # threads -> (runtime session, its layer)

    def _session(self, threads: int) -> tuple[object, _TimedLayer]:
        """The runtime's session on a one-layer model of the shape, with `threads` CPU threads (the engine
        fixes them when it is built: one per thread count)."""
        if threads in self._sessions:
            return self._sessions[threads]
        from pathlib import Path

        from tokenizers import Tokenizer, models
        from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

        from runtime.experts_hook import IMPLEMENTATION_NAME, register
        from runtime.loader import LoadedModel, find_experts
        from runtime.plan import Plan
        from runtime.session import Session

        s = self.shape
        k = s.experts_per_token
        config = MixtralConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=1,
                               num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                               num_local_experts=k, num_experts_per_tok=k, sliding_window=None,
                               vocab_size=s.vocab, max_position_embeddings=1 << 16, tie_word_embeddings=False,
                               eos_token_id=None, bos_token_id=None, pad_token_id=None)
        config._attn_implementation = "sdpa"  # what from_pretrained picks on the CPU
        config._experts_implementation = IMPLEMENTATION_NAME  # as `load_model` selects the runtime's hook
        register()
        gen = torch.Generator().manual_seed(0)
        default = torch.get_default_dtype()
        torch.set_default_dtype(TORCH_DTYPES[self.dtype])  # built in the model dtype: no float32 copy of it
        try:
            model = MixtralForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
        with torch.no_grad():
            for name, p in model.named_parameters():
                # Parameters start uninitialised (torch.empty); norms 1, the rest small and random, in place.
                p.fill_(1.0) if "norm" in name else p.normal_(0.0, 0.02, generator=gen)
        model = model.eval().requires_grad_(False)
        experts, routers = find_experts(model)
        # A real tokenizer over the vocabulary (one word per id): the loop decodes the result with it.
        vocab = {f"t{i}": i for i in range(s.vocab)}
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")))
        loaded = LoadedModel(model, tokenizer, experts, routers, torch.device("cpu"), Path(s.name), self.dtype)
        plan = Plan.from_dict({"version": 2, "model": {"name": s.name, "dtype": self.dtype},
                               "hardware": {"accelerator": "cpu", "cpu_threads": threads},
                               "cache": {"slots": 0, "policy": "lru"}, "miss": {"compute": "cpu"}})
        session = Session(loaded, plan)
        layer = _TimedLayer(model.model.layers[0])
        native = session.engine.native
        if native is not None and native.enabled:
            # the runtime decodes this model with its native step: time the layer there, through its seam
            # (a wrapped decoder layer would send every token back to transformers' slower path)
            native.around_layer = layer.around
        else:
            model.model.layers[0] = layer
        self._sessions[threads] = (session, layer)
        return self._sessions[threads]

    def time(self, context: int, *, warmup: int, repeats: int, min_seconds: float = 0.0, max_repeats: int = 50,
             flush: Callable[[], object] | None = None, sync: Callable[[], object] | None = None) -> Timing:
        """Time of one decode step outside the layers, from `context` positions on, with the thread count the
        caller set (see `time_in_loop`)."""
        if sync is not None:
            raise ValueError("the decode step is timed on the CPU: nothing to synchronise")
        return self.time_in_loop(context, warmup=warmup, repeats=repeats, min_seconds=min_seconds,
                                 max_repeats=max_repeats, flush=flush)[0]

    def time_in_loop(self, context: int, *, warmup: int, repeats: int, min_seconds: float = 0.0,
                     max_repeats: int = 50, flush: Callable[[], object] | None = None) -> tuple[Timing, Timing, float]:
        """(the step outside the layers, the decoder layer, the mean context of the timed tokens), each token
        of the runtime's generation after a prompt of `context` tokens one sample, with the thread count the
        caller set. The layer's time is that of its dense part and top-k experts among the rest of the runtime's
        decode step, as a run has it; `flush` runs after the layer, inside its (untimed) share: what the other
        layers of a decode step do in between."""
        session, layer = self._session(torch.get_num_threads())
        layer.flush = flush
        prompt = [3] * max(1, context)
        outside: list[float] = []
        inside: list[float] = []
        spent = 0.0
        tokens = session.stream(prompt, max_new_tokens=1 + warmup + max_repeats, text=False)  # type: ignore[attr-defined]
        try:
            next(tokens)  # the prompt's pass: `context` positions into the cache, untimed
            for i in range(warmup + max_repeats):
                layer.seconds = layer.layer_seconds = 0.0
                start = time.perf_counter()
                next(tokens)
                dt = time.perf_counter() - start - layer.seconds
                if i < warmup:
                    continue
                outside.append(dt)
                inside.append(layer.layer_seconds)
                spent += dt + layer.layer_seconds
                if len(outside) >= repeats and spent >= min_seconds:
                    break
        finally:
            tokens.close()
            layer.flush = None
        # token i of the timed ones attends to context + warmup + i positions (itself included)
        mean_context = context + warmup + (len(outside) + 1) / 2
        return summarize(outside), summarize(inside), mean_context
