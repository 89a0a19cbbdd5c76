"""Which models the native decode step runs (runtime/native_decode.py), and why another one is left alone.

The step replaces transformers' per-operation Python for a decode token of a model whose structure it
knows: pre-norm attention and a routed-experts MLP, as the five tested families write them in transformers
5. It recognises a model by its classes (the modeling code it stands in for) and by the config fields
those classes read that change a decode token, and refuses anything else with one reason, logged at debug
level: an unknown class, a sliding window, partial rotary, a dtype the C operations do not take, an
attention or experts implementation other than moeplan's. Routers, rotary embeddings and norms that are
not the C kernel's are not reimplemented: the step calls the model's own modules for them, so their
flags (router softmax order, norm_topk_prob, sparsemixer, rope scaling, LayerNorm) hold by construction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .decode_attention import NAME as CPU_ATTENTION
from .experts_hook import ATTRIBUTE, IMPLEMENTATION_NAME
from .kernels.decode_ops import DTYPES


@dataclass(frozen=True)
class Family:
    """How one family's decoder layer is built, as far as a decode token is concerned."""
    decoder: str  # the decoder layer's class: residual, norm, attention, residual, norm, MLP
    attention: str  # its self_attn class: q/k/v projections, rotary, cache, attention, o_proj
    block: str  # the routed MoE block's class
    router: str  # the block's router attribute
    dense_mlp: str | None = None  # a dense MLP class some layers may have instead (mlp_only_layers)
    qk_norm: str | None = None  # "head": q_norm/k_norm over each head; "projection": over the whole q and k
    shared_expert: bool = False  # a shared expert beside the routed ones, scaled by sigmoid(its gate)
    clip_qkv: bool = False  # config.clip_qkv clamps q, k and v after the norms


FAMILIES = {
    "MixtralForCausalLM": Family("MixtralDecoderLayer", "MixtralAttention", "MixtralSparseMoeBlock", "gate"),
    "Qwen2MoeForCausalLM": Family("Qwen2MoeDecoderLayer", "Qwen2MoeAttention", "Qwen2MoeSparseMoeBlock", "gate",
                                  dense_mlp="Qwen2MoeMLP", shared_expert=True),
    "Qwen3MoeForCausalLM": Family("Qwen3MoeDecoderLayer", "Qwen3MoeAttention", "Qwen3MoeSparseMoeBlock", "gate",
                                  dense_mlp="Qwen3MoeMLP", qk_norm="head"),
    "OlmoeForCausalLM": Family("OlmoeDecoderLayer", "OlmoeAttention", "OlmoeSparseMoeBlock", "gate",
                               qk_norm="projection", clip_qkv=True),
    "PhimoeForCausalLM": Family("PhimoeDecoderLayer", "PhimoeAttention", "PhimoeSparseMoeBlock", "router"),
}


def recognise(model: torch.nn.Module) -> tuple[Family | None, str]:
    """(the model's family, "") where the native step can run its decode tokens, else (None, the reason)."""
    family = FAMILIES.get(type(model).__name__)
    if family is None:
        return None, f"model class {type(model).__name__} is not one the native step knows"
    if model.training:
        return None, "the model is in training mode (routers and dropout behave differently)"
    config = model.config
    if getattr(config, "_attn_implementation", None) != CPU_ATTENTION:
        return None, f"attention implementation {getattr(config, '_attn_implementation', None)!r}, not {CPU_ATTENTION!r}"
    if getattr(config, "_experts_implementation", None) != IMPLEMENTATION_NAME:
        return None, f"experts implementation {getattr(config, '_experts_implementation', None)!r}, not moeplan's"
    if getattr(config, "sliding_window", None) is not None and (
            getattr(config, "use_sliding_window", True) or "sliding_attention" in (getattr(config, "layer_types", None) or [])):
        return None, f"sliding window {config.sliding_window}: attention would be masked"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or []):
        return None, f"layer types {sorted(set(config.layer_types))}: only full attention is handled"
    inner = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not isinstance(getattr(inner, name, None), torch.nn.Module):
            return None, f"the model has no {name} module where the family keeps it"
    if not isinstance(inner.embed_tokens, torch.nn.Embedding) or not isinstance(getattr(model, "lm_head", None),
                                                                                 torch.nn.Linear):
        return None, "embedding or lm_head is not a plain Embedding / Linear"
    dtype = inner.embed_tokens.weight.dtype
    if dtype not in DTYPES or inner.embed_tokens.weight.device.type != "cpu":
        return None, f"dtype {dtype} on {inner.embed_tokens.weight.device}: the C operations take fp32 and bf16 on the CPU"
    for i, layer in enumerate(inner.layers):
        reason = _layer_reason(layer, family, dtype)
        if reason:
            return None, f"layer {i}: {reason}"
    return family, ""


def _layer_reason(layer: torch.nn.Module, family: Family, dtype: torch.dtype) -> str:
    if type(layer).__name__ != family.decoder:
        return f"decoder layer class {type(layer).__name__}, expected {family.decoder}"
    attn = getattr(layer, "self_attn", None)
    if type(attn).__name__ != family.attention:
        return f"attention class {type(attn).__name__}, expected {family.attention}"
    if getattr(attn, "sliding_window", None) is not None:
        return f"sliding window {attn.sliding_window}"
    head_dim = getattr(attn, "head_dim", None)
    projections = [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if not isinstance(head_dim, int) or not all(isinstance(p, torch.nn.Linear) for p in projections):
        return "attention has no head_dim or q/k/v/o projections"
    q, k, v, o = projections
    if any(p.weight.dtype != dtype for p in projections):
        return "an attention projection's dtype differs from the model's"
    if q.out_features % head_dim or k.out_features % head_dim or k.out_features != v.out_features \
            or o.in_features != q.out_features or (q.out_features // head_dim) % (k.out_features // head_dim):
        return "q/k/v widths are not whole heads in groups"
    if not isinstance(getattr(attn, "scaling", None), float):
        return "attention has no float scaling"
    if family.qk_norm and not all(isinstance(getattr(attn, n, None), torch.nn.Module) for n in ("q_norm", "k_norm")):
        return "no q_norm/k_norm where the family has them"
    if not family.qk_norm and any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
        return "a q/k norm the family does not have"
    mlp = getattr(layer, "mlp", None)
    name = type(mlp).__name__
    if name == family.block:
        experts = getattr(mlp, "experts", None)
        if getattr(experts, ATTRIBUTE, None) is None:
            return "its experts module has no moeplan layer attached"
        if not isinstance(getattr(mlp, family.router, None), torch.nn.Module):
            return f"its MoE block has no {family.router}"
        if family.shared_expert and not all(isinstance(getattr(mlp, n, None), torch.nn.Module)
                                            for n in ("shared_expert", "shared_expert_gate")):
            return "no shared expert where the family has one"
    elif name != family.dense_mlp:
        return f"MLP class {name}, expected {family.block}" + (f" or {family.dense_mlp}" if family.dense_mlp else "")
    return ""
