"""One model shape for both sides: what the config reader says a model weighs is what transformers builds.

The runtime's memory guard and the planner's cost model both count bytes from
`runtime.contracts.model_shape` (read from config.json, no torch); this checks those counts against the
parameters of the model transformers builds from the same config, family by family.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from model_factory import FAMILIES
from runtime.loader import find_experts, inspect_model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shape_bytes_equal_the_built_model(family, dtype, checkpoint):
    folder, _ = checkpoint(family)
    shape = inspect_model(folder, dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=getattr(torch, dtype))
    experts, _ = find_experts(model)
    size = getattr(torch, dtype).itemsize
    expert_params = sum(p.numel() for m in experts for p in m.parameters(recurse=False))
    total = sum(p.numel() for p in model.parameters())
    assert shape.num_moe_layers == len(experts) and shape.num_experts == experts[0].num_experts
    assert shape.expert_bytes_total == expert_params * size
    assert shape.dense_bytes == (total - expert_params) * size
    config = model.config
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert shape.kv_bytes_per_token == 2 * config.num_hidden_layers * kv_heads * head_dim * size
