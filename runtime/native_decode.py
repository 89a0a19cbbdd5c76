"""The native decode step: a recognised model's decode token without transformers' per-operation Python.

With `accelerator: cpu` a decode token of the dense part costs more in transformers' modeling code (some
3,000 Python calls: decorators, views, the mask, the cache, the attention interface) than in arithmetic
(bench/results/decode_breakdown_avx2_run2.md). For a model runtime/native_recognise.py recognises, this
step runs the token from the checkpoint's own modules and weights, per layer in a handful of calls:

    add + RMSNorm (C) -> q, k, v (GEMV kernel) [+ bias, q/k norm, clip] -> rotary + KV-cache append +
    attention (one C call) -> o_proj (GEMV kernel) -> add + RMSNorm (C) -> router (the model's module) ->
    experts (the layer's MoeLayer, as the experts hook calls it) [+ shared expert]

The same functions do the same arithmetic as the swapped-in modules of the transformers path (KernelLinear,
KernelRMSNorm, the `moeplan_cpu` attention, runtime/kernels/decode_ops.c), in the same order, so the logits
are those of `model(...)` bit for bit (tests/runtime/test_native_decode.py). Norms the C kernel does not
reproduce (LayerNorm), routers, rotary embeddings and shared experts run as the model's own modules.
It shares the KV cache transformers' prefill filled (runtime/kv_cache.py's GrowingLayer): prefill stays on
transformers, and so does any token the step does not take (then nothing was touched).

`MOEPLAN_NATIVE_DECODE=0` in the environment turns it off (every token through transformers; for A/B
runs, bench/decode_split.py toggles `NativeDecode.enabled` in one process instead).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from .dense_linear import KernelLinear
from .dense_norm import KernelRMSNorm
from .experts_hook import ATTRIBUTE
from .kernels.decode_ops import DecodeOps, load_decode_ops
from .kv_cache import GrowingLayer
from .native_recognise import Family, recognise

log = logging.getLogger(__name__)
SWITCH = "MOEPLAN_NATIVE_DECODE"  # "0": off

Tensor = torch.Tensor


class NativeDecode:
    """Runs decode tokens of one loaded model; `step` returns None for a token it does not take."""

    def __init__(self, model: torch.nn.Module, family: Family, ops: DecodeOps) -> None:
        inner = model.model
        self.enabled = True
        self.tokens = 0  # decode tokens this step has run (the tests read it: proof that it ran)
        self.declined = 0  # decode tokens it handed back to transformers
        # When set, each layer runs as `around_layer(index, run)`, `run()` being the layer: the profiler's
        # seam to time a layer inside the step (wrapping a decoder layer module would make the step decline)
        self.around_layer: Callable[[int, Callable[[], tuple[Tensor, Tensor]]], tuple[Tensor, Tensor]] | None = None
        self._declined_reasons: set[str] = set()
        self._embedding = inner.embed_tokens.weight
        dtype = self._embedding.dtype
        self.dtype = dtype
        hidden = self._embedding.shape[1]
        # the residual stream and the latest norm's output: written by the C calls, read by the next step
        self._residual = torch.empty(hidden, dtype=dtype)
        self._normed = torch.empty(1, hidden, dtype=dtype)
        self._rotary = inner.rotary_emb
        layers = list(inner.layers)
        # the decoder layers it was built from: one replaced since (the profiler wraps one to time it) means
        # the model is no longer the one recognised, and its tokens go back to transformers
        self._built_from = (inner.layers._modules, tuple(layers))
        self._layers = [_Layer(layer, i, family, ops, model.config, self._residual, self._normed)
                        for i, layer in enumerate(layers)]
        self._final_norm = _residual_norm(inner.norm, ops, self._residual, self._normed)
        self._lm_head = _projection(model.lm_head, dtype, fresh=True)
        self._head_dim = self._layers[0].attention.head_dim

    def check_rotary(self) -> str:
        """Why the model's rotary embedding is not one the step takes (partial rotary, another dtype: such
        models stay on transformers), or the empty string where it covers whole heads in the model's dtype."""
        with torch.no_grad():
            cos, sin = self._rotary(self._embedding[:1].unsqueeze(0), torch.zeros(1, 1, dtype=torch.long))
        if cos.shape[-1] != self._head_dim or cos.dtype != self.dtype or sin.shape != cos.shape:
            return f"rotary embedding of width {cos.shape[-1]} ({cos.dtype}) for heads of {self._head_dim}"
        return ""

    def step(self, token: int, cache) -> Tensor | None:
        """The logits [vocab] after `token`, appended to `cache` at its end; None (cache untouched) where the
        cache is not one the step shares (no GrowingLayer, empty), or the step is off."""
        reason = self._decline(cache) if self.enabled else "switched off"
        if reason:
            self.declined += 1
            if reason not in self._declined_reasons:
                self._declined_reasons.add(reason)
                log.debug("native decode step declined a token: %s", reason)
            return None
        layers = cache.layers
        length = layers[0].keys.shape[-2]
        threads = torch.get_num_threads()
        # torch's own ops here are tiny (the router's 8-row product, its softmax and top-k), and with
        # more than one intra-op thread torch's linear wakes its thread pool for them: after the pauses
        # between them, on the AVX2 development machine under load, that wake-up cost 15 ms median
        # against 12 us on one thread. The C calls take their thread counts explicitly (the attention the
        # plan's, saved here), and these products give the same bits on one thread as on several (the
        # tests compare the logits with transformers' forward bit for bit on two threads).
        torch.set_num_threads(1)
        try:
            hidden = self._embedding[token]
            cos, sin = self._rotary(hidden, torch.tensor([[length]]))
            cos_ptr, sin_ptr = cos.data_ptr(), sin.data_ptr()
            delta = None
            around = self.around_layer
            for layer, cache_layer in zip(self._layers, layers):
                if around is None:
                    hidden, delta = layer(hidden, delta, cos_ptr, sin_ptr, length, cache_layer, threads)
                else:
                    hidden, delta = around(layer.index, lambda: layer(hidden, delta, cos_ptr, sin_ptr, length,
                                                                      cache_layer, threads))
            _, normed = self._final_norm(hidden, delta)
            logits = self._lm_head(normed)
        finally:
            torch.set_num_threads(threads)
        self.tokens += 1
        return logits

    def _decline(self, cache) -> str:
        modules, built = self._built_from
        if tuple(modules.values()) != built:
            return "a decoder layer was replaced after the step was built"
        layers = getattr(cache, "layers", None)
        if not layers or len(layers) != len(self._layers):
            return "the cache does not have one layer per decoder layer"
        for layer in layers:
            if type(layer) is not GrowingLayer:
                return f"cache layer {type(layer).__name__}, not a GrowingLayer"
            if not layer.is_initialized or layer.keys.dim() != 4 or layer.keys.shape[0] != 1 \
                    or layer.keys.shape[-2] == 0:
                return "the cache holds no prompt (prefill runs on transformers)"
        return ""


class _Layer:
    """One decoder layer's decode token: (residual, previous layer's MLP output) -> (residual, this MLP output)."""

    def __init__(self, layer: torch.nn.Module, index: int, family: Family, ops: DecodeOps, config,
                 residual: Tensor, normed: Tensor) -> None:
        self.index = index
        self.input_norm = _residual_norm(layer.input_layernorm, ops, residual, normed)
        self.attention = _Attention(layer.self_attn, family, ops, config)
        self.post_norm = _residual_norm(layer.post_attention_layernorm, ops, residual, normed)
        self.mlp = _mlp(layer.mlp, family)

    def __call__(self, hidden: Tensor, delta: Tensor | None, cos_ptr: int, sin_ptr: int, length: int,
                 cache_layer: GrowingLayer, threads: int) -> tuple[Tensor, Tensor]:
        hidden, normed = self.input_norm(hidden, delta)
        hidden, normed = self.post_norm(hidden, self.attention(normed, cos_ptr, sin_ptr, length, cache_layer, threads))
        return hidden, self.mlp(normed)


class _Attention:
    """q, k, v, their biases, norms and clip as the family has them; then rotary, cache append and attention in
    one C call; then o_proj."""

    def __init__(self, attn: torch.nn.Module, family: Family, ops: DecodeOps, config) -> None:
        self.head_dim = dim = attn.head_dim
        dtype = attn.q_proj.weight.dtype
        self.heads, self.kv_heads = attn.q_proj.out_features // dim, attn.k_proj.out_features // dim
        self.q, self.k, self.v = (_projection(p, dtype) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        self.o = _projection(attn.o_proj, dtype)
        self.q_norm = self.k_norm = None
        if family.qk_norm:  # over each head ([heads, D]) or over the whole projection ([1, 1, heads * D])
            per_head = family.qk_norm == "head"
            self.q_norm = _inner_norm(attn.q_norm, ops, (self.heads, dim) if per_head else (1, 1, self.heads * dim))
            self.k_norm = _inner_norm(attn.k_norm, ops, (self.kv_heads, dim) if per_head else (1, 1, self.kv_heads * dim))
        clip = getattr(config, "clip_qkv", None) if family.clip_qkv else None
        self.clip = float(clip) if clip is not None else None
        self.scale = float(attn.scaling)
        self.is_bf16 = int(dtype == torch.bfloat16)
        self.out = torch.empty(self.heads * dim, dtype=dtype)
        self._out_ptr = self.out.data_ptr()
        self._call = ops.rope_append_attend_raw
        self._scratch = ops.scratch
        self._cache_seen: tuple[Tensor | None, Tensor | None] = (None, None)  # (buffer, keys view) we last left

    def __call__(self, x: Tensor, cos_ptr: int, sin_ptr: int, length: int, cache_layer: GrowingLayer,
                 threads: int) -> Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            c = self.clip
            q.clamp_(min=-c, max=c)
            k.clamp_(min=-c, max=c)
            v.clamp_(min=-c, max=c)
        keys, values = self._room(cache_layer, length)
        heads = self.heads
        self._call(self.is_bf16, q.data_ptr(), k.data_ptr(), v.data_ptr(), cos_ptr, sin_ptr, keys.data_ptr(),
                   values.data_ptr(), heads, self.kv_heads, length, self.head_dim, keys.stride(1), keys.stride(2),
                   values.stride(1), values.stride(2), self.scale, threads,
                   self._scratch(heads * (length + 1 + self.head_dim)), self._out_ptr)
        view = keys.narrow(2, 0, length + 1)
        cache_layer.keys, cache_layer.values = view, values.narrow(2, 0, length + 1)
        self._cache_seen = (keys, view)
        return self.o(self.out)

    def _room(self, layer: GrowingLayer, length: int) -> tuple[Tensor, Tensor]:
        """The layer's key and value buffers, with room for one more position after `length` and holding the
        layer's keys and values: GrowingLayer.update's own bookkeeping, without the copy of the new token."""
        keys = layer._key_buffer
        seen_buffer, seen_view = self._cache_seen
        # the layer as this step left it last token (the common case), or checked as GrowingLayer checks it
        mine = keys is not None and keys is seen_buffer and layer.keys is seen_view
        if (not mine and not layer._owns_views()) or keys is None or length >= keys.shape[-2]:
            layer._regrow(length, length + 1, layer.keys, layer.values)
        return layer._key_buffer, layer._value_buffer


def _projection(linear: torch.nn.Module, dtype: torch.dtype, fresh: bool = False) -> Callable[[Tensor], Tensor]:
    """x -> linear(x) for one token, as a flat tensor: the GEMV kernel's one-token call KernelLinear binds,
    into a buffer reused every token (`fresh`: a new one each call, for outputs that leave the step), with
    the bias added as KernelLinear adds it; the module itself where it has no one-token call."""
    one_token = linear._one_token if isinstance(linear, KernelLinear) else None
    weight = linear.weight
    if one_token is None or weight.dtype != dtype or not weight.is_contiguous():
        return lambda x: linear(x).reshape(-1)
    bias = linear._bias
    width = linear.out_features
    out = torch.empty(width, dtype=dtype)

    def run(x: Tensor) -> Tensor:
        y = torch.empty(width, dtype=dtype) if fresh else out
        one_token(x, y, linear.threads)
        return y if bias is None else y.add_(bias)

    return run


def _inner_norm(norm: torch.nn.Module, ops: DecodeOps, shape: tuple[int, ...]) -> Callable[[Tensor], Tensor]:
    """A q or k norm over `shape`'s last dimension, in place where the C RMSNorm is the module's (a
    KernelRMSNorm), else the module on a view of that shape (a new tensor)."""
    if isinstance(norm, KernelRMSNorm):
        raw, weight, eps = ops._norm, norm._weight, norm.variance_epsilon
        is_bf16, width = int(norm._dtype == torch.bfloat16), shape[-1]

        def run(x: Tensor) -> Tensor:
            ptr = x.data_ptr()
            raw(is_bf16, ptr, weight.data_ptr(), ptr, x.numel() // width, width, eps)
            return x

        return run
    return lambda x: norm(x.view(shape)).reshape(-1)


def _residual_norm(norm: torch.nn.Module, ops: DecodeOps, residual: Tensor,
                   normed: Tensor) -> Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]]:
    """(hidden, delta) -> (hidden + delta, norm(hidden + delta)) with delta None meaning no add (the first
    layer's input): one C call into the step's residual and norm buffers where the norm is a KernelRMSNorm,
    else torch's add and the module (its output [1, H])."""
    if isinstance(norm, KernelRMSNorm):
        add_norm, plain = ops.add_rms_norm_raw, ops._norm
        weight, eps, hidden = norm._weight, norm.variance_epsilon, residual.numel()
        is_bf16 = int(norm._dtype == torch.bfloat16)
        residual_ptr, normed_ptr = residual.data_ptr(), normed.data_ptr()

        def run(x: Tensor, delta: Tensor | None) -> tuple[Tensor, Tensor]:
            if delta is None:
                plain(is_bf16, x.data_ptr(), weight.data_ptr(), normed_ptr, 1, hidden, eps)
                return x, normed
            if not delta.is_contiguous():  # every MLP and projection here gives a contiguous one; a guard
                delta = delta.contiguous()
            add_norm(is_bf16, x.data_ptr(), delta.data_ptr(), residual_ptr, weight.data_ptr(), normed_ptr, hidden, eps)
            return residual, normed

        return run
    width = residual.numel()

    def run_module(x: Tensor, delta: Tensor | None) -> tuple[Tensor, Tensor]:
        if delta is not None:
            x = x + delta.view(x.shape)
        return x, norm(x).view(1, width)

    return run_module


def _mlp(mlp: torch.nn.Module, family: Family) -> Callable[[Tensor], Tensor]:
    """x [1, H] -> the layer's MLP output: router (the model's module), then the experts through the layer's
    MoeLayer as the experts hook calls it, plus the shared expert where the family has one; or a dense MLP
    layer's own module."""
    if type(mlp).__name__ != family.block:
        return mlp
    router = getattr(mlp, family.router)
    moe = getattr(mlp.experts, ATTRIBUTE).forward
    if not family.shared_expert:
        def routed(x: Tensor) -> Tensor:
            _, weights, experts = router(x)
            return moe(x, experts, weights)

        return routed
    shared, shared_gate = mlp.shared_expert, mlp.shared_expert_gate

    def with_shared(x: Tensor) -> Tensor:  # Qwen2MoeSparseMoeBlock.forward's order
        shared_out = shared(x)
        _, weights, experts = router(x)
        out = moe(x, experts, weights)
        return out + torch.sigmoid(shared_gate(x)) * shared_out

    return with_shared


def build(model: torch.nn.Module) -> NativeDecode | None:
    """The native decode step for this model (with its CPU decode path and experts hook in place), or None:
    switched off, or not recognised (the reason logged at debug level)."""
    if os.environ.get(SWITCH, "1") == "0":
        log.debug("native decode step off (%s=0)", SWITCH)
        return None
    ops = load_decode_ops()
    if ops is None:
        log.debug("native decode step not used: the C decode operations are not available here")
        return None
    family, reason = recognise(model)
    if family is None:
        log.debug("native decode step not used: %s", reason)
        return None
    step = NativeDecode(model, family, ops)
    reason = step.check_rotary()
    if reason:
        log.debug("native decode step not used: %s", reason)
        return None
    log.debug("native decode step on for %s", type(model).__name__)
    return step
