"""Every family, a spread of plans: the runtime generates what plain transformers computes."""
from __future__ import annotations

import json
import os

import pytest
import torch

from model_factory import FAMILIES, num_experts
from runtime.kernels import load as load_kernel
from runtime.plan import Plan
from runtime.session import Session

# bench/device_check.sh runs this file with MOEPLAN_TEST_ACCELERATOR=cuda:0 on a GPU machine
ACCELERATOR = os.environ.get("MOEPLAN_TEST_ACCELERATOR", "cpu")
PROMPT = "def main(argv):\n    for name in"
TOL = 1e-3
# with the CPU as the accelerator and the C kernels built, decode tokens go through the native decode step
NATIVE = ACCELERATOR == "cpu" and load_kernel() is not None


def assert_native_ran(session: Session, generated: list[int], where: str) -> None:
    """Every decode token of a CPU plan ran through the native step (its counter), where it can run here."""
    if NATIVE:
        native = session.engine.native
        assert native is not None and native.tokens == len(generated) - 1, f"{where}: the native step did not run"

# name -> plan fields (slots, policy, preload, compute, transfer_min_tokens, promote, threads, lookahead)
PLANS = {
    "all-cpu-1-thread": dict(slots=0, policy="lru", compute="cpu", threads=1),
    "slot-1-lru-promote": dict(slots=1, policy="lru", promote=True),
    "lfu-preload-transfer": dict(slots=3, policy="lfu", preload="popular", transfer_min_tokens=3, promote=True),
    "fifo-accelerator": dict(slots=2, policy="fifo", compute="accelerator"),
    "static": dict(slots=2, policy="static", preload="popular"),
    "static-accelerator": dict(slots=2, policy="static", preload="popular", compute="accelerator"),
    "per-layer-list": dict(slots=[0, 4, 1], policy="lru", transfer_min_tokens=2, promote=True),
    "all-cached": dict(slots="all", policy="lru", preload="popular", promote=True),
    "prefetch": dict(slots=3, policy="lru", promote=True, lookahead=1),
    # markov declines misses that score below their victim: declined promotions and declined transfers
    # (computed from scratch memory) are what this plan adds
    "markov-transfer": dict(slots=2, policy="markov", transfer_min_tokens=2, promote=True),
    "zero-slots-accelerator": dict(slots=0, policy="lru", compute="accelerator"),
}


def make_plan(spec: dict, experts: int, layers: int) -> Plan:
    slots = spec.get("slots", 0)
    if slots == "all":
        slots = experts
    per_layer = slots if isinstance(slots, list) else [slots] * layers
    preload = "none"
    if spec.get("preload") == "popular":
        preload = [list(range(experts - 1, experts - 1 - n, -1)) for n in per_layer]
    return Plan.from_dict({
        "version": 1,
        "model": {"name": "test", "dtype": "float32"},
        "hardware": {"accelerator": ACCELERATOR, "cpu_threads": spec.get("threads", 2)},
        "cache": {"slots": slots, "policy": spec["policy"], "preload": preload},
        "miss": {"compute": spec.get("compute", "cpu"), "transfer_min_tokens": spec.get("transfer_min_tokens", 0),
                 "promote": spec.get("promote", False)},
        "prefetch": {"lookahead": spec.get("lookahead", 0)},
    })


def reference_gaps(folder, prompt_ids: list[int], generated: list[int]) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + generated])).logits[0]
    n = len(prompt_ids)
    return [float(logits[n - 1 + i].max() - logits[n - 1 + i, t]) for i, t in enumerate(generated)]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_plan_matches_transformers(family, checkpoint, tmp_path):
    folder, config = checkpoint(family)
    experts, layers = num_experts(config), config.num_hidden_layers
    for name, spec in PLANS.items():
        plan = make_plan(spec, experts, layers)
        session = Session.load(plan, folder)
        trace = tmp_path / f"{name}.jsonl"
        result = session.generate(PROMPT, max_new_tokens=8, trace_out=trace)
        assert_native_ran(session, result.generated_ids, f"{family}/{name}")
        gaps = reference_gaps(folder, list(session.loaded.tokenizer(PROMPT)["input_ids"]), result.generated_ids)
        assert max(gaps) <= TOL, f"{family}/{name}: token off the reference argmax by {max(gaps):.3g}"

        cache = result.stats["cache"]
        passes = [json.loads(line) for line in trace.read_text().splitlines()[1:]]
        needed = sum(len({e for tok in layer for e in tok}) for p in passes for layer in p["experts"])
        assert cache["hits"] + cache["misses"] == needed, f"{family}/{name}: every needed expert counts once"
        if spec.get("slots") == 0:
            assert cache["hits"] == 0
        if spec.get("slots") == "all":
            assert cache["misses"] == 0, f"{family}/{name}: all experts preloaded, yet misses"
        if spec.get("compute") == "accelerator":
            assert result.stats["cpu_misses"] == 0
        if name == "lfu-preload-transfer":
            assert result.stats["accelerator_misses"] > 0, "the prefill should reach the transfer threshold"


@pytest.mark.skipif(ACCELERATOR != "cpu", reason="the bf16 CPU decode path (C norms, attention, fused experts)")
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_cpu_decode_matches_transformers_bf16(family, checkpoint):
    """In bf16 the CPU decode path (kernel projections, C RMSNorm and attention, the fused experts token)
    rounds where transformers rounds: its greedy tokens are the bf16 reference's argmax, up to bf16
    rounding of the logits (about 4e-3 at their scale here)."""
    from transformers import AutoModelForCausalLM

    folder, config = checkpoint(family)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    for name in ("all-cpu-1-thread", "slot-1-lru-promote"):
        plan = Plan.from_yaml(make_plan(PLANS[name], num_experts(config), config.num_hidden_layers).to_yaml()
                              .replace("dtype: float32", "dtype: bfloat16"))
        session = Session.load(plan, folder)
        result = session.generate(PROMPT, max_new_tokens=8)
        assert_native_ran(session, result.generated_ids, f"{family}/{name} bf16")
        prompt_ids = list(session.loaded.tokenizer(PROMPT)["input_ids"])
        with torch.no_grad():
            logits = reference(torch.tensor([prompt_ids + result.generated_ids])).logits[0].float()
        n = len(prompt_ids)
        gaps = [float(logits[n - 1 + i].max() - logits[n - 1 + i, t]) for i, t in enumerate(result.generated_ids)]
        assert max(gaps) <= 1e-2, f"{family}/{name} bf16: token off the reference argmax by {max(gaps):.3g}"
