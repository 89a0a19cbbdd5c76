"""The arithmetic of one expert: up (and gate) projection, activation, down projection.

One function for every device and every family: the module's own flags (`has_gate`, `has_bias`,
`is_transposed`, `has_post_expert_norm`) and its `_apply_gate` decide the layout, never an assumption
about Mixtral.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def ffn(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, gate: Callable[[torch.Tensor], torch.Tensor],
        transposed: bool = False, b_in: torch.Tensor | None = None,
        b_out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] -> [T, H] through one expert.

    w_in is [2I, H] (gate and up, concatenated or interleaved as `gate` expects) or [I, H] without a gate;
    w_out is [H, I]; with `transposed` both are stored the other way round ([H, 2I], [I, H]).
    """
    h = x @ w_in if transposed else F.linear(x, w_in)  # [T, 2I] or [T, I]
    if b_in is not None:
        h = h + b_in
    h = gate(h)  # [T, I]
    out = h @ w_out if transposed else F.linear(h, w_out)  # [T, H]
    if b_out is not None:
        out = out + b_out
    return out


def silu_gate(h: torch.Tensor) -> torch.Tensor:
    """Mixtral's gate: SiLU(gate) * up, with gate and up concatenated along the last dimension."""
    g, u = h.chunk(2, dim=-1)
    return F.silu(g) * u


def in_proj_name(module: torch.nn.Module) -> str:
    """The name of the experts module's input projection: fused gate+up, or up alone."""
    return "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"


def module_gate(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation between the two projections, as the experts module defines it."""
    if getattr(module, "has_gate", True):
        return module._apply_gate
    return module.act_fn


def module_expert_ffn(module: torch.nn.Module, x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
                      b_in: torch.Tensor | None, b_out: torch.Tensor | None,
                      transposed: bool | None = None) -> torch.Tensor:
    """One expert of `module` on x, with the weights given (from a cache slot or from host memory);
    `transposed` overrides the module's layout flag (dequantized experts are in the standard layout)."""
    if transposed is None:
        transposed = getattr(module, "is_transposed", False)
    out = ffn(x, w_in, w_out, module_gate(module), transposed, b_in, b_out)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    return out


def add_weighted(out: torch.Tensor, tokens: torch.Tensor, ranks: torch.Tensor, y: torch.Tensor,
                 top_k_weights: torch.Tensor) -> None:
    """out[tokens] += y * the gate weight of each token for this expert (its rank `ranks`), in fp32.

    A token chooses an expert at most once, so `tokens` has no duplicates.
    """
    out.index_add_(0, tokens, y.float() * top_k_weights[tokens, ranks, None])
