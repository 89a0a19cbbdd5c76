"""The measurement code on small shapes, and `moeplan profile` through the real CLI (in-process).

Sizes are small so that the whole file runs in seconds on a busy 2-core machine; the numbers are checked
for sanity (positive, finite, ordered), never against a speed.
"""
from __future__ import annotations

import json
import math
import os

import psutil
import pytest
import torch

from planner.cli import main as cli_main
from planner.profile import Profile
from planner.profile.measure import ExpertPool, StreamBuffer, summarize, thread_counts, time_call, time_cpu_expert
from planner.profile.measure_dense import DecodeStepBench, DenseLayerBench, LayerShape
from planner.profile.measure_moe import MoeLayerBench
from runtime.contracts.cache_policy import POLICIES


def test_summarize_median_and_spread():
    t = summarize([3.0, 1.0, 2.0, 5.0, 4.0])
    assert t.median_s == 3.0 and t.min_s == 1.0 and t.repeats == 5
    assert t.spread == pytest.approx((5.0 - 1.0) / 3.0)
    assert summarize([2.0, 4.0]).median_s == 3.0


def test_time_call_runs_warmup_before_and_enough_repeats():
    calls = []
    t = time_call(lambda: calls.append("call"), warmup=2, repeats=4, before=lambda: calls.append("before"))
    assert t.repeats == 4 and calls == ["before", "call"] * 6
    assert time_call(lambda: None, repeats=3, min_seconds=0.01, max_repeats=7).repeats == 7


def test_thread_counts():
    assert thread_counts(2, quick=True) == [1, 2] and thread_counts(1, quick=False) == [1]
    assert thread_counts(24, quick=False) == [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24]
    assert thread_counts(64, quick=True) == [1, 64]


def test_cpu_expert_timing_is_positive_and_finite():
    pool = ExpertPool(128, 256, "bfloat16", pool_bytes=4 << 20)
    assert pool.copies == math.ceil((4 << 20) / (3 * 128 * 256 * 2))
    for tokens in (1, 16):
        t = time_cpu_expert(128, 256, "bfloat16", tokens, 1, pool=pool, repeats=3)
        assert 0 < t.median_s < 1 and math.isfinite(t.spread) and t.spread >= 0
    with pytest.raises(ValueError, match="pool holds"):
        time_cpu_expert(128, 512, "bfloat16", 1, 1, pool=pool)


def test_more_threads_never_read_less_than_half_of_one_thread():
    buf = StreamBuffer(96 << 20)
    cores = psutil.cpu_count(logical=False) or 1
    rates = {n: buf.read_gbps(n, warmup=1, repeats=9)[0] for n in sorted({1, cores})}
    assert all(math.isfinite(r) and r > 0 for r in rates.values())
    # A multi-threaded pass needs all its cores at once. When other processes already keep them busy
    # (load average at or above the core count), every pass waits on the scheduler and the rate says
    # nothing about the memory: the property is checked on a machine that is not oversubscribed.
    load = os.getloadavg()[0]
    if cores > 1 and load >= cores:
        pytest.skip(f"load average {load:.1f} on {cores} cores: thread scaling not observable ({rates})")
    assert all(r >= rates[1] / 2 for r in rates.values()), rates


def test_dense_layer_timing_decode_and_prefill():
    bench = DenseLayerBench(LayerShape("t", 64, 128, 4, 2, 16, 4), "float32", "cpu")
    torch.set_num_threads(1)
    for tokens, context in ((1, 32), (8, 8)):
        t = bench.time(tokens, context, warmup=1, repeats=3)
        assert 0 < t.median_s < 1
    with pytest.raises(ValueError, match="tokens must be in 1..context"):
        bench.time(9, 8, warmup=0, repeats=1)


def test_moe_layer_paths_warm_and_cold():
    """The runtime's CPU paths on a pool's copies: each times positive; warm calls take the same experts,
    cold ones the next in the pool; the host copy of an expert too."""
    pool = ExpertPool(64, 96, "bfloat16", pool_bytes=1 << 20, min_copies=4)
    bench = MoeLayerBench(pool)
    assert bench.store.host[0].data_ptr() == pool.w_in.data_ptr()  # the store reads the pool itself
    assert bench.experts(2, "warm") == bench.experts(2, "warm") == [0, 1]
    first, second = bench.experts(2, "cold"), bench.experts(2, "cold")
    assert not set(first) & set(second)
    cases = [("run", 2, 1), ("run", 1, 8), ("torch", 1, 8)] + ([("token", 2, 1)] if bench.fits_token(1) else [])
    for path, experts, tokens in cases:
        for cache in ("warm", "cold"):
            t = bench.time(path, experts, tokens, 1, cache, warmup=1, repeats=3)
            assert 0 < t.median_s < 1 and math.isfinite(t.spread)
    assert 0 < bench.time_copy(1, warmup=1, repeats=3).median_s < 1
    with pytest.raises(ValueError, match="token path runs one token"):
        bench.time("token", 2, 8, 1, "cold", warmup=0, repeats=1)
    with pytest.raises(ValueError, match="pool of at least"):
        bench.time("run", pool.copies, 1, 1, "cold", warmup=0, repeats=1)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_moe_layer_paths_run_the_int_experts(fmt):
    """int8/int4 copies of one expert, as quantize-at-load leaves a module, sized by their own bytes; the
    runtime's paths on them compute what the float paths compute on the dequantized expert."""
    from runtime.contracts.expert_format import expert_bytes
    from runtime.quant_format import dequantize

    bench = MoeLayerBench.quantized(64, 96, fmt, "bfloat16", pool_bytes=1 << 20, min_copies=4)
    one = expert_bytes(fmt, 64, 96)
    assert bench.store.quantized is not None and bench.store.quantized.fmt == fmt and bench.format == fmt
    assert bench.expert_bytes == one and bench.copies == max(4, -(-(1 << 20) // one))
    assert not [n for n, _ in bench.module.named_parameters()]  # the float weights are gone
    cases = [("run", 2, 1), ("run", 1, 8), ("torch", 1, 8)] + ([("token", 2, 1)] if bench.fits_token(1) else [])
    for path, experts, tokens in cases:
        for cache in ("warm", "cold"):
            t = bench.time(path, experts, tokens, 1, cache, warmup=1, repeats=3)
            assert 0 < t.median_s < 1 and math.isfinite(t.spread)
    # what the timed call computes: the float path on the dequantized weights (to the model dtype's rounding)
    q = bench.store.quantized
    w_in = dequantize(q.qweight["gate_up_proj"][0], q.scales["gate_up_proj"][0], fmt, torch.float32)
    w_out = dequantize(q.qweight["down_proj"][0], q.scales["down_proj"][0], fmt, torch.float32)
    with torch.inference_mode():
        got = bench.call("run", 1, 8, 1, "warm")()
    gen = torch.Generator().manual_seed(1)  # the inputs `call` draws: x, then the gate weights
    x = (torch.randn(8, 64, generator=gen) * 0.1).to(torch.bfloat16).float()
    weights = torch.softmax(torch.randn(8, 1, generator=gen), dim=-1)
    h = (x @ w_in.T).bfloat16().float()
    want = ((torch.nn.functional.silu(h[:, :96]) * h[:, 96:]).bfloat16().float() @ w_out.T) * weights
    assert got.shape == (8, 64) and want.abs().max() > 0
    assert (got.float() - want).abs().max() <= 0.02 * want.abs().max()


def test_decode_step_timing():
    """The runtime's own generation loop on a one-layer model of the shape: the step outside the layer, the
    layer inside the loop (the flush after it, inside its share, counted in neither), both on the native
    decode step the runtime runs."""
    torch.set_num_threads(1)
    bench = DecodeStepBench(LayerShape("t", 64, 128, 4, 2, 16, 4, 2, 300), "float32", "cpu")
    buf = StreamBuffer(8 << 20)
    for flush in (None, buf.flush, lambda: buf.evict(1 << 20)):
        assert 0 < bench.time(16, warmup=1, repeats=3, flush=flush).median_s < 1
    native = bench._session(1)[0].engine.native
    assert native is not None
    flushed, before = [], native.tokens
    step, layer, context = bench.time_in_loop(16, warmup=1, repeats=4, flush=lambda: flushed.append(1))
    # each decode token's layer, run by the runtime's native decode step as in a run (the prompt's pass runs
    # on transformers, untimed and unflushed)
    assert step.repeats == layer.repeats == 4 and len(flushed) == 1 + 4
    assert native.tokens - before == 1 + 4 and native.declined == 0
    assert 0 < step.median_s < 1 and 0 < layer.median_s < 1 and context == 16 + 1 + 2.5
    with pytest.raises(ValueError, match="no vocabulary size"):
        DecodeStepBench(LayerShape("t", 64, 128, 4, 2, 16, 4), "float32", "cpu")


TINY = ["--quick", "--shape", "128:256:4:2:32:4:2:500", "--stream-mb", "32", "--pool-mb", "4", "--tokens", "1,8",
        "--contexts", "16", "--no-progress"]


def test_profile_command_writes_a_valid_measured_profile(tmp_path, capsys):
    out = tmp_path / "host.yaml"
    assert cli_main(["profile", "--out", str(out), "--name", "testhost", *TINY]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    p = Profile.load(out)
    cores = psutil.cpu_count(logical=False) or 1
    assert (p.name, p.source, p.physical_cores, p.has_accelerator) == ("testhost", "measured", cores, False)
    threads = sorted({1, cores})
    assert sorted(p.cpu.memory_read_gbps) == threads
    # (float dtypes + int formats) x threads x token counts
    assert len(p.cpu.expert_ffn) == (2 + 2) * len(threads) * 2
    assert {r.dtype for r in p.cpu.expert_ffn} == {"bfloat16", "float32", "int8", "int4"}
    # dtypes x threads x (decode at one context, prefill), cold; warm too where the cache size is known
    caches = 2 if p.llc_bytes else 1
    assert len(p.cpu.dense_layer) == 2 * len(threads) * 2 * caches
    assert {r.cache for r in p.cpu.dense_layer} == ({"warm", "cold"} if p.llc_bytes else {"cold"})
    # The MoE layer's paths: run (1 and top-k experts) and torch at each token count, token where it applies.
    # Float dtypes and int formats alike (the int ones through the executor's quantized path).
    run = [r for r in p.cpu.moe_layer if r.path == "run"]
    assert len(run) == (2 + 2) * len(threads) * (1 + 2) * caches and {(r.experts, r.tokens) for r in run} == {
        (1, 1), (2, 1), (2, 8)}
    assert len([r for r in p.cpu.moe_layer if r.path == "torch"]) == (2 + 2) * len(threads) * 2 * caches
    assert {r.dtype for r in p.cpu.moe_layer} == {"bfloat16", "float32", "int8", "int4"}
    assert all(r.experts == 2 and r.tokens == 1 for r in p.cpu.moe_layer if r.path == "token")
    assert len(p.cpu.model_step) == 2 * len(threads) * caches and {r.vocab for r in p.cpu.model_step} == {500}
    # the layer inside the runtime's decode loop, beside each decode step row (the step's prompt: context 16)
    assert len(p.cpu.decode_layer) == len(p.cpu.model_step)
    assert all(r.experts == 2 and r.context > 16 and (r.hidden, r.intermediate) == (128, 256) for r in p.cpu.decode_layer)
    assert sorted(p.cpu.memory_copy_gbps or {}) == threads
    for n in threads:
        assert 0 < p.memory_read_gbps(n) < 1e4
        assert 0 < p.cpu_expert_seconds(128, 256, "bfloat16", 4, n) < 1
        for fmt in ("int8", "int4"):  # the int rows answer for int experts (the cost model reads them)
            assert 0 < p.cpu_expert_seconds(128, 256, fmt, 4, n) < 1
    assert p.cpu.expert_overhead_s is not None and p.cpu.expert_overhead_s > 0
    assert p.cpu.layer_overhead_s is not None and p.cpu.layer_overhead_s >= 0
    # each cache policy's bookkeeping at the shape's width (4 experts, top-2): 1 and 2 slots
    assert {(r.policy, r.experts, r.top_k, r.slots) for r in p.cpu.policy_step} == {
        (policy, 4, 2, n) for policy in POLICIES for n in (1, 2)}
    assert all(0 < r.median_s < 0.01 for r in p.cpu.policy_step)


@pytest.mark.parametrize("argv,message", [
    (["--shape", "1:2:3"], "--shape: expected H:I:HEADS:KV:HEAD_DIM"),
    (["--shape", "64:128:4:3:16"], "KV heads must divide heads"),
    (["--shape", "64:128:4:2:16:4:5"], "top-k must not exceed the experts"),
    (["--model", "no-such-model"], "not a known model nor a checkpoint folder"),
    (["--tokens", "1,x"], "--tokens: expected comma-separated integers"),
    (["--accelerator", "tpu"], "--accelerator: expected cuda:N, none or auto"),
])
def test_profile_command_user_errors(tmp_path, capsys, argv, message):
    assert cli_main(["profile", "--out", str(tmp_path / "x.yaml"), *argv]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without CUDA")
def test_profile_command_refuses_cuda_without_cuda(tmp_path, capsys):
    assert cli_main(["profile", "--out", str(tmp_path / "x.yaml"), "--accelerator", "cuda:0"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


def test_profile_command_reads_the_shape_from_a_checkpoint_config(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "hidden_size": 96, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "num_local_experts": 4,
        "num_experts_per_tok": 2, "vocab_size": 100, "torch_dtype": "bfloat16"}))
    out = tmp_path / "p.yaml"
    tiny = [a for a in TINY if a not in ("--shape", "128:256:4:2:32:4:2:500")]
    assert cli_main(["profile", "--model", str(ckpt), "--out", str(out), "--threads", "1", *tiny]) == 0
    p = Profile.load(out)
    assert {(r.hidden, r.intermediate) for r in p.cpu.expert_ffn} == {(96, 160)}
    assert {(r.hidden, r.heads, r.kv_heads, r.head_dim) for r in p.cpu.dense_layer} == {(96, 4, 2, 32)}
    assert sorted(p.cpu.memory_read_gbps) == [1]
