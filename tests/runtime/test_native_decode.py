"""The native decode step (runtime/native_decode.py) gives transformers' logits bit for bit, shares the KV cache
transformers' prefill filled, runs for every tested family, and leaves what it does not recognise alone."""
from __future__ import annotations

import pytest
import torch

from model_factory import FAMILIES, build_checkpoint, num_experts
from runtime.kernels.decode_ops import load_decode_ops
from runtime.kv_cache import GrowingLayer, use_growing_layers
from runtime.native_recognise import recognise
from runtime.plan import Plan
from runtime.session import Session, _forward_arguments
from test_conformance import PLANS, PROMPT, make_plan

pytestmark = pytest.mark.skipif(load_decode_ops() is None, reason="no C compiler or no AVX2 on this CPU")

# a family with the config variants its modeling code reads (biases, clip, dense MLP layers)
VARIANTS = {
    "qwen3_moe-bias-dense-layer": ("qwen3_moe", dict(attention_bias=True, mlp_only_layers=[1])),
    "olmoe-clip-bias": ("olmoe", dict(clip_qkv=0.4, attention_bias=True)),
    "phimoe-biases": ("phimoe", dict(attention_bias=True, lm_head_bias=True)),
    "qwen2_moe-dense-layer": ("qwen2_moe", dict(mlp_only_layers=[0])),
}


def _session(folder, config, dtype: str, plan_name: str = "all-cpu-1-thread") -> Session:
    plan = make_plan(PLANS[plan_name], num_experts(config), config.num_hidden_layers)
    return Session.load(Plan.from_yaml(plan.to_yaml().replace("dtype: float32", f"dtype: {dtype}")), folder)


def _new_cache(model):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    use_growing_layers(cache)
    return cache


@torch.inference_mode()
def _step_by_step(session: Session, prompt_ids: list[int], steps: int) -> None:
    """Prefill two caches with transformers; then, token by token, the native step on one and transformers'
    forward on the other: equal logits and equal caches at every step."""
    model, native = session.loaded.model, session.engine.native
    ours, theirs = _new_cache(model), _new_cache(model)
    kwargs = _forward_arguments(model, theirs)
    ids = torch.tensor([prompt_ids])
    first = model(input_ids=ids, **_forward_arguments(model, ours)).logits[0, -1]
    assert torch.equal(first, model(input_ids=ids, **kwargs).logits[0, -1])
    token = int(first.argmax())
    before = native.tokens
    for step in range(steps):
        expected = model(input_ids=torch.tensor([[token]]), **kwargs).logits[0, -1]
        got = native.step(token, ours)
        assert got is not None, "the native step declined a decode token of a recognised model"
        assert got.dtype == expected.dtype and torch.equal(got, expected), \
            f"step {step}: logits differ by {float((got.float() - expected.float()).abs().max()):.3g}"
        for a, b in zip(ours.layers, theirs.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        token = int(expected.argmax())
    assert native.tokens == before + steps  # the counter: these tokens ran natively


@pytest.mark.parametrize("dtype,plan", [("float32", "all-cpu-1-thread"), ("bfloat16", "slot-1-lru-promote")])
@pytest.mark.parametrize("family", FAMILIES)
def test_native_logits_equal_transformers_bit_for_bit(family, dtype, plan, checkpoint):
    """One thread and two (the step runs torch's small ops on one: they must give the same bits)."""
    folder, config = checkpoint(family)
    session = _session(folder, config, dtype, plan)
    assert session.engine.native is not None, f"{family}: not recognised"
    # 70 prompt tokens and 6 more: the cache buffers (64 positions at first) grow during the native steps
    _step_by_step(session, list(range(2, 72)), steps=6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_native_logits_equal_transformers_config_variants(variant, tmp_path):
    family, overrides = VARIANTS[variant]
    config = build_checkpoint(family, tmp_path, **overrides)
    session = _session(tmp_path, config, "bfloat16", "prefetch")
    assert session.engine.native is not None, f"{variant}: not recognised"
    _step_by_step(session, list(range(2, 20)), steps=5)


@pytest.mark.parametrize("family", FAMILIES)
def test_session_output_identical_with_the_step_off(family, checkpoint, monkeypatch):
    """Session.generate with the step (on every decode token: the counter says so) and without it (the
    documented switch): the same tokens, for plans whose MoE layers take different paths."""
    folder, config = checkpoint(family)
    for plan_name in ("all-cpu-1-thread", "slot-1-lru-promote", "prefetch"):
        with monkeypatch.context() as env:
            env.setenv("MOEPLAN_NATIVE_DECODE", "0")
            off = _session(folder, config, "bfloat16", plan_name)
        assert off.engine.native is None
        on = _session(folder, config, "bfloat16", plan_name)
        a, b = on.generate(PROMPT, max_new_tokens=10), off.generate(PROMPT, max_new_tokens=10)
        assert a.generated_ids == b.generated_ids, f"{family}/{plan_name}"
        assert on.engine.native.tokens == len(a.generated_ids) - 1 and on.engine.native.declined == 0
        assert a.stats["cache"] == b.stats["cache"], f"{family}/{plan_name}: the MoE layers saw other passes"


def test_sliding_window_model_is_not_recognised_and_runs_as_before(tmp_path):
    from transformers import AutoModelForCausalLM

    config = build_checkpoint("mixtral", tmp_path, sliding_window=6)
    session = _session(tmp_path, config, "float32")
    assert session.engine.native is None
    family, reason = recognise(session.loaded.model)
    assert family is None and "sliding window" in reason
    result = session.generate(PROMPT, max_new_tokens=6)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    prompt_ids = list(session.loaded.tokenizer(PROMPT)["input_ids"])
    with torch.no_grad():
        logits = reference(torch.tensor([prompt_ids + result.generated_ids])).logits[0]
    n = len(prompt_ids)
    assert [int(logits[n - 1 + i].argmax()) for i in range(len(result.generated_ids))] == result.generated_ids


def test_unrecognised_models_and_caches_are_declined(checkpoint):
    folder, config = checkpoint("mixtral")
    session = _session(folder, config, "float32")
    model, native = session.loaded.model, session.engine.native
    model.train()
    assert recognise(model)[0] is None and "training" in recognise(model)[1]
    model.eval()
    model.config._attn_implementation = "eager"  # another attention: its numerics are not the C loop's
    assert "attention implementation" in recognise(model)[1]
    model.config._attn_implementation = "moeplan_cpu"
    assert recognise(model)[0] is not None
    # a cache the step does not share (transformers' own DynamicLayer; an empty one) is left untouched
    from transformers import DynamicCache

    plain = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([[2, 3, 4]]), **_forward_arguments(model, plain))
        before = [layer.keys.clone() for layer in plain.layers]
        assert native.step(5, plain) is None
        assert native.step(5, _new_cache(model)) is None
    assert all(torch.equal(layer.keys, b) for layer, b in zip(plain.layers, before))
    assert native.declined == 2 and native.tokens == 0
    assert all(type(layer) is GrowingLayer for layer in _new_cache(model).layers)


def test_a_replaced_decoder_layer_sends_tokens_back_to_transformers(checkpoint):
    """The profiler wraps a decoder layer to time it after the session is built: that layer must run."""
    folder, config = checkpoint("qwen3_moe")
    session = _session(folder, config, "float32")
    layers = session.loaded.model.model.layers
    calls = []

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.inner(*args, **kwargs)

    reference = session.generate(PROMPT, max_new_tokens=5).generated_ids
    layers[1] = Wrapped(layers[1])
    assert session.generate(PROMPT, max_new_tokens=5).generated_ids == reference
    assert len(calls) == 5 and session.engine.native.declined == 4  # the prefill, then 4 decode tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_routers_take_one_token_through_torchs_own_gemm(family, checkpoint):
    """runtime/cpu_decode.py: every MoE router of a CPU-decode model runs a one-token input with oneDNN off
    (the same result as its own forward with oneDNN off), a prompt with it on,
    and leaves the switch as it found it."""
    folder, config = checkpoint(family)
    session = _session(folder, config, "bfloat16")
    routers = [m for m in session.loaded.model.modules() if "forward" in m.__dict__ and type(m).__name__.endswith("Router")]
    assert len(routers) == config.num_hidden_layers, f"{family}: {len(routers)} routers wrapped"
    router = routers[0]
    unwrapped = type(router).forward.__get__(router)
    torch.manual_seed(0)
    for rows in (1, 5):
        x = torch.randn(rows, config.hidden_size).bfloat16()
        torch._C._set_mkldnn_enabled(rows != 1)  # what torch.backends.mkldnn.flags sets, without its warning
        try:
            want = unwrapped(x)
        finally:
            torch._C._set_mkldnn_enabled(True)
        got = router(x)
        assert torch._C._get_mkldnn_enabled()
        for a, b in zip(got, want):
            assert torch.equal(a, b), f"{family}: {rows} rows"
