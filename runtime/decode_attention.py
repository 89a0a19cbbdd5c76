"""Attention of one decode token on the CPU in one C call, through transformers' attention interface.

transformers 5 lets a library register an attention function (`AttentionInterface.register`) and its mask
format (`AttentionMaskInterface.register`) and select it per model (`set_attn_implementation`). moeplan
registers `moeplan_cpu`: with sdpa's masks, and sdpa's own function for everything but the one case it
computes itself, an unmasked single query of batch 1 over the KV cache (every decode step without padding
or a sliding window in force). There torch's flash-attention dispatch costs about 140 µs per layer on the
AVX2 development machine, the C loop (runtime/kernels/decode_ops.c) about 20 to 40 µs at short contexts.
"""
from __future__ import annotations

from typing import Any

import torch

from .kernels.decode_ops import DTYPES, DecodeOps, load_decode_ops

NAME = "moeplan_cpu"
# keyword arguments that change what attention computes, which the C loop does not implement
_UNSUPPORTED = ("softcap", "s_aux", "sinks", "position_bias")


def _takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
           dropout: float, kwargs: dict[str, Any]) -> bool:
    # cheapest tests first: this runs once per layer per token
    if attention_mask is not None or dropout != 0.0 or not query.is_cpu or query.dtype not in DTYPES:
        return False
    batch, heads, tokens, dim = query.shape
    if batch != 1 or tokens != 1 or not key.dtype == value.dtype == query.dtype:
        return False
    return (dim == key.shape[-1] == value.shape[-1] and key.shape[1] == value.shape[1]
            and heads % key.shape[1] == 0 and key.stride(-1) == 1 and value.stride(-1) == 1
            and (not kwargs or all(kwargs.get(name) is None for name in _UNSUPPORTED)))


def cpu_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The attention function's contract: query [B, Hq, T, D], key and value [B, Hkv, L, D]; returns
    ([B, T, Hq, D], None) as sdpa_attention_forward does."""
    ops = load_decode_ops()
    if ops is None or not _takes(query, key, value, attention_mask, dropout, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return ops.attend_one(query, key, value, scale, torch.get_num_threads()), None


def use_cpu_decode_attention(model: torch.nn.Module, ops: DecodeOps | None) -> bool:
    """Select `moeplan_cpu` for a model whose attention goes through sdpa (another choice, eager or a
    model-specific one, is the user's or the model's and is kept); returns whether it was selected.
    A bare module (the profiler's decoder layer) gets it in the config its attention reads."""
    config = getattr(model, "config", None)
    if config is None:  # a decoder layer: its attention module holds the config
        config = next((m.config for m in model.modules() if hasattr(m, "config")), None)
    if ops is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, cpu_decode_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(NAME)
    else:
        config._attn_implementation = NAME
    return config._attn_implementation == NAME
