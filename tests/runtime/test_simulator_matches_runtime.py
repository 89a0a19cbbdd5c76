"""The simulator's hit and miss counts equal the runtime's for the same routing, layer by layer.

The routing is real: OLMoE-1B-7B's recorded trace, replayed through a small OLMoE-shaped checkpoint
(16 MoE layers, 64 experts, top-8) with `--replay-trace`; the runtime's own `--trace-out` is then
replayed through the simulator with the same plan.
"""
from __future__ import annotations

import pytest

from model_factory import make_tokenizer
from planner.paths import TRACES
from planner.routing.simulator import simulate
from runtime.contracts.traces import load_trace
from runtime.plan import Plan
from runtime.session import Session

OLMOE_TRACE = TRACES / "olmoe-1b-7b-decode-299.jsonl"

PLANS = {
    "all-cpu": "cache: {slots: 0, policy: lru}",  # no cache: a decode token takes all_cpu_outcome (MoeLayer._decide)
    "lru-promote": "cache: {slots: 16, policy: lru}\nmiss: {promote: true}",
    "lfu-transfer": "cache: {slots: 8, policy: lfu}\nmiss: {promote: true, transfer_min_tokens: 2}",
    "fifo-accelerator": "cache: {slots: 6, policy: fifo}\nmiss: {compute: accelerator}",
    "static": "cache: {slots: 4, policy: static, preload: " + str([[0, 1, 2, 3]] * 16) + "}",
    # 6 slots < top-8: every pass also takes the adaptive rule for a pass needing more than the slots
    "adaptive-promote": "cache: {slots: 6, policy: adaptive}\nmiss: {promote: true}",
    "adaptive-transfer": "cache: {slots: 16, policy: adaptive}\nmiss: {promote: true, transfer_min_tokens: 2}",
    # markov declines misses that score below their victim: every kind of entry takes that test
    "markov-promote": "cache: {slots: 6, policy: markov}\nmiss: {promote: true}",
    "markov-transfer": "cache: {slots: 16, policy: markov}\nmiss: {promote: true, transfer_min_tokens: 2}",
    "markov-accelerator": "cache: {slots: 8, policy: markov}\nmiss: {compute: accelerator}",
    # prefetch replayed from the guesses the run recorded: exact, not statistical
    "lru-prefetch": "cache: {slots: 16, policy: lru}\nmiss: {promote: true}\nprefetch: {lookahead: 1}",
    "adaptive-prefetch": "cache: {slots: 8, policy: adaptive}\nmiss: {promote: true}\nprefetch: {lookahead: 1}",
    "markov-prefetch": "cache: {slots: 8, policy: markov}\nmiss: {promote: true}\nprefetch: {lookahead: 1}",
    "per-layer": "cache: {slots: " + str([0, 8, 16, 32] * 4) + ", policy: lru}\nmiss: {promote: true}",
}


@pytest.fixture(scope="module")
def olmoe_shaped(tmp_path_factory):
    import torch
    import transformers as tf

    folder = tmp_path_factory.mktemp("olmoe16")
    torch.manual_seed(0)
    config = tf.OlmoeConfig(vocab_size=320, hidden_size=32, intermediate_size=16, num_hidden_layers=16,
                            num_attention_heads=2, num_key_value_heads=1, num_experts=64, num_experts_per_tok=8,
                            max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    make_tokenizer(folder)
    return folder


@pytest.mark.parametrize("name", PLANS)
def test_counts_equal(name, olmoe_shaped, tmp_path):
    plan = Plan.from_yaml(f"version: 1\nmodel: {{dtype: float32}}\nhardware: {{cpu_threads: 1}}\n{PLANS[name]}")
    session = Session.load(plan, olmoe_shaped, replay_trace=OLMOE_TRACE)
    out = tmp_path / "run.jsonl"
    result = session.generate("import os\nimport sys", max_new_tokens=24, trace_out=out)
    trace = load_trace(out)
    assert trace.header.num_layers == 16 and len(trace.passes) == len(result.generated_ids)
    slots = plan.cache.slots_per_layer(16, 64)
    rule = plan.miss.rule
    sim = simulate(trace, slots, plan.cache.policy, plan.cache.preload_per_layer(16, 64), rule,
                   lookahead=plan.prefetch.lookahead, replay_guesses=True)
    assert all(p.guesses is not None and p.guesses[0] == () for p in trace.passes)  # recorded, prefetch or not
    ran = result.stats["cache"]
    assert (sim.hits, sim.misses) == (ran["hits"], ran["misses"])
    assert [(c.hits, c.misses) for c in sim.per_layer] == [(c["hits"], c["misses"]) for c in ran["per_layer"]]
    assert sim.hits > 0 or name in ("static", "all-cpu")  # these two never hit
    copies = sum(c.prefetches for c in (*sim.prefill, *([sim.decode] * sim.decode.passes)))
    assert round(copies) == result.stats["prefetch"]["copies"]
    assert (copies > 0) == name.endswith("-prefetch")
