"""The reference the quantized-expert conformance tests compare with: plain transformers with each expert
quantized and dequantized into the model's dtype, and how far a run's tokens fall below its best logits."""
from __future__ import annotations

from pathlib import Path

import torch

from runtime.loader import find_experts
from runtime.quant_experts import projection_names
from runtime.quant_format import dequantize, quantize

GROUP = 32  # the default group size
# Expert widths the default group size divides (the factory's Qwen and OLMoE experts are 48 wide).
QUANTIZABLE = {"qwen2_moe": {"moe_intermediate_size": 64}, "qwen3_moe": {"moe_intermediate_size": 64},
               "olmoe": {"intermediate_size": 64}}


def reference_model(folder: Path, fmt: str | None, dtype: torch.dtype):
    """Plain transformers in `dtype`; `fmt`: its experts quantized and dequantized into `dtype` first."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    if fmt is not None:
        for module in find_experts(model)[0]:
            for p in projection_names(module):
                param = getattr(module, p)
                q, s = quantize(param.data, fmt, GROUP)
                param.data = dequantize(q, s, fmt, dtype)
    return model


def reference_gaps(model, prompt_ids: list[int], generated: list[int]) -> list[float]:
    """How far each generated token's logit is below the reference's best after the same prefix (0 where
    the token is the reference's greedy choice)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0].float()
    n = len(prompt_ids)
    return [float(logits[n - 1 + i].max() - logits[n - 1 + i, t]) for i, t in enumerate(generated)]
