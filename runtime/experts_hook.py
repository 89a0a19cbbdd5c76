"""The one place where transformers hands moeplan a MoE layer's work.

transformers 5 dispatches every experts module decorated with `use_experts_implementation` through
`ExpertsInterface`; moeplan registers its forward under the name below and selects it at load time
(`experts_implementation="moeplan"`). The forward looks up the layer's `MoeLayer` (attached to the
module by the engine) and lets it decide hit, miss, CPU or accelerator. No modeling code is copied.
"""
from __future__ import annotations

import torch

IMPLEMENTATION_NAME = "moeplan"
ATTRIBUTE = "_moeplan_layer"


def moeplan_experts_forward(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                            top_k_weights: torch.Tensor) -> torch.Tensor:
    layer = getattr(module, ATTRIBUTE, None)
    if layer is None:
        raise RuntimeError("moeplan experts implementation called on a module the engine did not prepare")
    return layer.forward(hidden_states, top_k_index, top_k_weights)


def register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION_NAME, moeplan_experts_forward)
