"""Cost model: a pure function whose predictions move the way the hardware and the replay say."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.catalog import load_model_shape
from planner.cost_model import cache_state, decode_bytes, predict
from planner.profile import Profile
from planner.routing.simulator import PassCounts, SimResult, popular_preload
from planner.routing.workload import replay, resolve_trace
from runtime.plan import CacheSpec, Plan

ROOT = Path(__file__).resolve().parents[2]

# Vendor data-sheet figures of an RTX 4070 desktop (see the file's comment).
PUBLISHED_PATH = Path(__file__).resolve().parent / "data" / "desktop-rtx4070-published.yaml"
PUBLISHED = yaml.safe_load(PUBLISHED_PATH.read_text())


@pytest.fixture(scope="module")
def profile() -> Profile:
    return Profile.from_dict(PUBLISHED)


def _plan(accelerator: str = "cuda:0", threads: int = 8, slots: int = 16, promote: bool = True,
          name: str = "olmoe-1b-7b", transfer: int = 32) -> Plan:
    return Plan.from_dict({"version": 1, "model": {"name": name, "dtype": "bfloat16"},
                           "hardware": {"accelerator": accelerator, "cpu_threads": threads},
                           "cache": {"slots": slots, "policy": "lru"},
                           "miss": {"compute": "cpu", "transfer_min_tokens": transfer, "promote": promote}})


@pytest.fixture(scope="module")
def olmoe_trace():
    shape = load_model_shape("olmoe-1b-7b")
    trace, source = resolve_trace(shape, None, prompt_tokens=64)
    assert "recorded" in source and trace.prefill_passes()[0].tokens == 64
    return shape, trace


def test_importing_the_planner_core_does_not_import_torch() -> None:
    code = ("import sys, planner.cost_model, planner.catalog, planner.routing.workload, planner.commands.explain; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_accelerator_and_cpu_sides_overlap_as_the_runtime_schedules_them(profile, olmoe_trace, monkeypatch) -> None:
    """The runtime's CUDA order computes the CPU misses while the hits run (runtime/contracts/schedule.py): a
    GPU plan's layer costs the larger of the two sides. A schedule that did not overlap them would add them."""
    import planner.cost_model as cost_model

    shape, trace = olmoe_trace
    plan = _plan()
    sim = replay(trace, plan, shape)
    overlapped = predict(profile, shape, plan, sim, context=512, prompt_tokens=64)
    assert overlapped.decode.hit_s > 0 and overlapped.decode.cpu_miss_s > 0 and overlapped.decode.overlap_s < 0
    monkeypatch.setattr(cost_model, "CPU_OVERLAPS_ACCELERATOR", False)
    serial = predict(profile, shape, plan, sim, context=512, prompt_tokens=64)
    assert serial.decode.overlap_s == 0
    assert overlapped.decode.total_s == pytest.approx(serial.decode.total_s + overlapped.decode.overlap_s
                                                      + overlapped.decode.copy_excess_s - serial.decode.copy_excess_s)


def test_host_syncs_are_charged_once_per_moe_layer_from_the_profile(profile, olmoe_trace) -> None:
    """A CUDA plan blocks the host HOST_SYNCS_PER_MOE_LAYER times per MoE layer per pass, each the profile's
    `accelerator.host_sync_s`; a profile without the figure charges none and says so."""
    from runtime.contracts.schedule import HOST_SYNCS_PER_MOE_LAYER

    shape, trace = olmoe_trace
    plan = _plan(promote=False)  # no background copies, whose time beyond the pass would absorb the syncs
    sim = replay(trace, plan, shape)
    without = predict(profile, shape, plan, sim, context=512, prompt_tokens=64)
    assert without.decode.host_sync_s == 0 and any("host_sync_s" in n for n in without.notes)
    acc = dataclasses.replace(profile.accelerator, host_sync_s=3e-5)
    timed = predict(dataclasses.replace(profile, accelerator=acc), shape, plan, sim, context=512, prompt_tokens=64)
    expected = 3e-5 * HOST_SYNCS_PER_MOE_LAYER * shape.num_moe_layers
    assert timed.decode.host_sync_s == pytest.approx(expected)
    assert timed.decode.total_s == pytest.approx(without.decode.total_s + expected)
    cpu_plan = predict(profile, shape, _plan("cpu"), replay(trace, _plan("cpu"), shape), context=512, prompt_tokens=64)
    assert cpu_plan.decode.host_sync_s == 0


def test_background_copies_take_dram_time_from_the_cpu_misses(profile, olmoe_trace) -> None:
    """Promotion copies read host DRAM while the CPU misses stream from it: the bytes copied during a layer's
    CPU work cost it their time at the DRAM read rate; without promotions nothing is charged."""
    shape, trace = olmoe_trace
    promote = _plan(promote=True)
    p = predict(profile, shape, promote, replay(trace, promote, shape), context=512, prompt_tokens=64)
    d = p.decode
    assert d.background_copy_s > 0 and d.copy_contention_s > 0
    dram = profile.memory_read_gbps(8) * 1e9
    copy_rate = shape.expert_bytes / profile.h2d_seconds(shape.expert_bytes, pinned=True)
    # never more than every copied byte at the DRAM rate, nor more than the CPU time's worth of copying
    copied = d.background_copy_s * copy_rate
    assert d.copy_contention_s <= copied / dram * (1 + 1e-9)
    assert d.copy_contention_s <= d.cpu_miss_s * copy_rate / dram * (1 + 1e-9)
    quiet = _plan(promote=False)
    q = predict(profile, shape, quiet, replay(trace, quiet, shape), context=512, prompt_tokens=64)
    assert q.decode.background_copy_s == 0 and q.decode.copy_contention_s == 0


def test_breakdown_adds_up(profile, olmoe_trace) -> None:
    shape, trace = olmoe_trace
    plan = _plan()
    p = predict(profile, shape, plan, replay(trace, plan, shape), context=512, prompt_tokens=64)
    for b in (p.decode, p.prefill):
        assert b.total_s == pytest.approx(b.dense_s + b.hit_s + b.cpu_miss_s + b.transfer_s + b.copy_excess_s
                                          + b.overlap_s + b.host_sync_s + b.copy_contention_s)
        assert b.overlap_s <= 0 and 0 <= b.copy_excess_s <= b.background_copy_s
    assert p.decode_tokens_per_s == pytest.approx(1 / p.decode.total_s)
    assert p.prefill_tokens_per_s == pytest.approx(64 / p.prefill.total_s)
    assert 0 < p.hit_rate < 1 and p.fits


def test_more_slots_never_slower_on_the_recorded_trace(profile, olmoe_trace) -> None:
    """A static cache of the most used experts: more slots, more hits, no copies, never slower."""
    shape, trace = olmoe_trace
    rates, hit_rates = [], []
    for slots in (1, 8, 16, 32, 64):
        preload = popular_preload(trace, [slots] * shape.num_moe_layers)
        plan = dataclasses.replace(_plan(slots=slots), cache=CacheSpec(
            slots=slots, policy="static", preload=tuple(tuple(ids) for ids in preload)))
        p = predict(profile, shape, plan, replay(trace, plan, shape), 512, 64)
        rates.append(p.decode_tokens_per_s)
        hit_rates.append(p.hit_rate)
    assert hit_rates == sorted(hit_rates) and hit_rates[-1] == pytest.approx(1.0, abs=0.01)
    assert rates == sorted(rates) and rates[-1] > 2 * rates[0]


@settings(max_examples=60, deadline=None)
@given(hits=st.floats(0, 60), misses=st.floats(0, 60), moved=st.floats(0, 1), copies=st.floats(0, 60),
       accelerator=st.sampled_from(["cuda:0", "cpu"]))
def test_turning_misses_into_hits_never_slows(hits, misses, moved, copies, accelerator) -> None:
    """An expert that hits instead of missing can only save time. With a GPU, one exception: when the
    GPU side is the longer one, the hit adds its own (small) GPU time while the CPU miss it replaces
    ran for free beside it."""
    profile = Profile.from_dict(PUBLISHED)
    shape = load_model_shape("olmoe-1b-7b")
    plan = _plan(accelerator=accelerator)

    def sim(h: float, m: float) -> SimResult:
        decode = PassCounts(1, 1.0, h, h, m, m, 0.0, 0.0, copies, 0.0)
        return SimResult(0, 0, (), decode, ())

    k = misses * moved
    before = predict(profile, shape, plan, sim(hits, misses), 256, 16).decode.total_s
    after = predict(profile, shape, plan, sim(hits + k, misses - k), 256, 16).decode.total_s
    bound = k * profile.accelerator_expert_seconds(shape.hidden, shape.expert_intermediate, shape.dtype, 1)
    assert after <= before * (1 + 1e-12) + (bound if accelerator != "cpu" else 0.0)


def test_more_threads_never_slower_where_the_profile_says_faster(profile, olmoe_trace) -> None:
    shape, trace = olmoe_trace
    for accelerator in ("cuda:0", "cpu"):
        rates = []
        for threads in (1, 2, 4, 8):
            plan = _plan(accelerator=accelerator, threads=threads)
            rates.append(predict(profile, shape, plan, replay(trace, plan, shape), 512, 64).decode_tokens_per_s)
        assert rates == sorted(rates) and rates[-1] > rates[0], accelerator


def test_the_prediction_follows_a_profile_where_two_threads_are_slower(olmoe_trace) -> None:
    shape, trace = olmoe_trace
    data = {**PUBLISHED, "cpu": {**PUBLISHED["cpu"], "expert_gbps": {"bfloat16": {1: 12.0, 2: 3.0}},
                                 "memory_read_gbps": {1: 20.0, 2: 5.0}}}
    slow = Profile.from_dict(data)
    one, two = (predict(slow, shape, p, replay(trace, p, shape), 512, 64).decode_tokens_per_s
                for p in (_plan(threads=1), _plan(threads=2)))
    assert two < one


def test_a_plan_that_does_not_fit_is_reported_with_numbers(profile) -> None:
    shape = load_model_shape("mixtral")
    plan = _plan(name="mixtral-8x7b", slots=4)
    decode = PassCounts(1, 1.0, 40.0, 40.0, 24.0, 24.0, 0.0, 0.0, 10.0, 0.0)
    sim = SimResult(40, 24, (), decode, ())
    p = predict(profile, shape, plan, sim, context=1024, prompt_tokens=128)
    assert not p.fits
    need = p.memory_bytes["accelerator"]
    assert need > 4 * 32 * shape.expert_bytes  # 128 slots of 352 MB: 45 GB
    assert p.memory_limit_bytes["accelerator"] == 12878610432
    assert any(note.startswith("accelerator: needs") and str(need) in note and "12878610432" in note
               for note in p.notes)
    assert p.memory_items["host"]["experts"] == shape.expert_bytes_total
    # The tuner's budget replaces the profile's memory; a plan without slots still needs the dense part.
    roomy = predict(profile, shape, plan, sim, 1024, 128, vram_budget=need)
    assert roomy.memory_bytes == p.memory_bytes and roomy.fits is (p.memory_bytes["host"] <= 64 * 2**30)


def test_cpu_plans_keep_everything_in_host_memory(profile) -> None:
    shape = load_model_shape("olmoe-1b-7b")
    plan = _plan(accelerator="cpu", slots=4)
    sim = SimResult(1, 1, (), PassCounts(1, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0), ())
    p = predict(profile, shape, plan, sim, 100, 10)
    assert set(p.memory_bytes) == {"host"}
    assert p.memory_items["host"]["expert_slots"] == 16 * 4 * shape.expert_bytes
    assert p.decode.overlap_s == 0  # serial on the CPU
    assert p.decode.copy_excess_s == p.decode.background_copy_s  # a host copy is CPU work


def test_a_gpu_plan_on_a_profile_without_gpu_does_not_fit(profile) -> None:
    cpu_only = dataclasses.replace(profile, accelerator=None)
    shape = load_model_shape("olmoe-1b-7b")
    sim = SimResult(1, 1, (), PassCounts(1, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0), ())
    p = predict(cpu_only, shape, _plan(), sim, 100, 10)
    assert not p.fits and p.memory_limit_bytes["accelerator"] == 0
    assert any("no accelerator" in n for n in p.notes)


def test_measured_dense_layers_replace_the_fitted_formula(olmoe_trace) -> None:
    """With this model's attention shape in the profile's dense_layer table, the dense part is the
    measured layer time (interpolated over context) x layers + the lm_head's bytes."""
    shape, trace = olmoe_trace
    rows = [{"hidden": 2048, "heads": 16, "kv_heads": 16, "dtype": "bfloat16", "threads": 8, "tokens": 1,
             "context": c, "median_s": t, "spread": 0.01} for c, t in ((256, 1.0e-3), (1024, 2.0e-3))]
    profile = Profile.from_dict({**PUBLISHED, "cpu": {**PUBLISHED["cpu"], "dense_layer": rows}})
    plan = _plan(accelerator="cpu", threads=8)
    sim = replay(trace, plan, shape)
    p = predict(profile, shape, plan, sim, context=640, prompt_tokens=64)
    lm_head = shape.vocab * shape.hidden * 2 / (profile.memory_read_gbps(8) * 1e9)
    assert p.decode.dense_s == pytest.approx(16 * 1.5e-3 + lm_head)
    fitted = predict(Profile.from_dict(PUBLISHED), shape, plan, sim, context=640, prompt_tokens=64)
    assert fitted.decode.dense_s != pytest.approx(p.decode.dense_s)
    assert p.decode.cpu_miss_s == fitted.decode.cpu_miss_s


# ---- the runtime's own CPU paths: warm or cold, fused one-token call, decode step, host copies ---------
TINY = ROOT / "models" / "tiny-moe"  # hidden 256, expert intermediate 512, 4 MoE layers of 8, top-2


def _paths_profile(llc: int | None, copy_gbps: float | None = 8.0) -> Profile:
    """The published profile with this host's timings of the tiny model's paths, warm and cold: every
    warm figure a tenth of its cold one, so that the test sees which the cost model took."""
    def rows(cold: dict) -> list[dict]:
        return [{**r, "cache": cache, "median_s": r["median_s"] / (10 if cache == "warm" else 1)}
                for r in cold for cache in ("cold", "warm")]
    moe = {"hidden": 256, "intermediate": 512, "dtype": "bfloat16", "threads": 2, "spread": 0.1}
    cpu = {**PUBLISHED["cpu"],
           "dense_layer": rows([{"hidden": 256, "heads": 8, "kv_heads": 4, "head_dim": 32, "dtype": "bfloat16",
                                 "threads": 2, "tokens": 1, "context": 512, "median_s": 1e-3, "spread": 0.1}]),
           "moe_layer": rows([{**moe, "path": "token", "experts": 2, "tokens": 1, "median_s": 2e-4},
                              {**moe, "path": "torch", "experts": 1, "tokens": 1, "median_s": 3e-4},
                              {**moe, "path": "run", "experts": 1, "tokens": 1, "median_s": 2.5e-4},
                              {**moe, "path": "run", "experts": 2, "tokens": 1, "median_s": 4e-4}]),
           "model_step": rows([{"hidden": 256, "vocab": 4096, "dtype": "bfloat16", "threads": 2,
                                "median_s": 5e-4, "spread": 0.1}])}
    if copy_gbps is not None:
        cpu["memory_copy_gbps"] = {2: copy_gbps}
    host = {**PUBLISHED["host"], **({"llc_bytes": llc} if llc is not None else {})}
    return Profile.from_dict({**PUBLISHED, "host": host, "cpu": cpu})


def _decode_sim(layers: int, hits: float, misses: float, transfers: float = 0.0, copies: float = 0.0) -> SimResult:
    """One decode pass of `layers` MoE layers with these counts per layer (the replay sums over layers)."""
    n = layers
    decode = PassCounts(1, 1.0, hits * n, hits * n, misses * n, misses * n, transfers * n, transfers * n,
                        copies * n, 0.0)
    return SimResult(0, 0, (), decode, ())


def test_warm_or_cold_by_whether_a_decode_token_fits_the_last_level_cache() -> None:
    shape = load_model_shape(str(TINY))
    per_token = decode_bytes(shape, 512)
    # 4 layers of attention, norms and router, the lm_head, 2 experts in each of 4 layers, the KV cache.
    assert per_token == (sum(shape.dense_params_per_layer) * 2 + 4096 * 256 * 2 + 4 * 2 * 3 * 256 * 512 * 2
                         + shape.kv_bytes_per_token * 512)
    assert cache_state(_paths_profile(per_token), shape, 512) == "warm"
    assert cache_state(_paths_profile(per_token - 1), shape, 512) == "cold"
    assert cache_state(_paths_profile(None), shape, 512) == "cold"  # no cache size recorded: cold, as before
    assert cache_state(_paths_profile(per_token), shape, 4096) == "cold"  # a longer KV cache no longer fits
    bench = load_model_shape("mixtral")
    assert cache_state(_paths_profile(1 << 40), bench, 512) == "warm"
    assert cache_state(_paths_profile(32 << 20), bench, 512) == "cold"


@pytest.mark.parametrize("fits", [True, False])
def test_a_cpu_plan_decodes_with_the_measured_fused_call_layer_and_step(fits) -> None:
    """No slots: each MoE layer's two misses cost one fused `token` call; dense = layers x the dense row +
    the decode step; all warm when the model fits the cache, all cold when it does not."""
    shape = load_model_shape(str(TINY))
    llc = decode_bytes(shape, 512) + (0 if fits else -1)
    p = predict(_paths_profile(llc), shape, _plan(accelerator="cpu", threads=2, slots=0, name="tiny-moe"),
                _decode_sim(4, hits=0.0, misses=2.0), context=512, prompt_tokens=16)
    scale = 0.1 if fits else 1.0
    assert p.decode.cpu_miss_s == pytest.approx(4 * 2e-4 * scale)
    assert p.decode.dense_s == pytest.approx((4 * 1e-3 + 5e-4) * scale)
    assert p.decode.hit_s == 0 and p.decode.total_s == pytest.approx(p.decode.dense_s + p.decode.cpu_miss_s)
    assert any(n.startswith(f"CPU timings {'warm' if fits else 'cold'}: a decode token reads") for n in p.notes)


def test_a_cpu_plan_adds_what_a_layer_takes_in_the_runtimes_loop_beyond_its_parts() -> None:
    """`cpu.decode_layer`: the layer (dense + top-k experts, fused) timed inside the runtime's decode loop;
    what it takes beyond the same run's dense row at its context and token row is added per MoE layer to a
    CPU plan's decode step, in the plan's cache state; less than the parts (the native decode step) takes
    time off, down to no dense time at all; not to prefill, not on a GPU."""
    shape = load_model_shape(str(TINY))
    base = _paths_profile(None)  # cold: dense 1e-3 at every context, fused token call 2e-4
    layer = {"hidden": 256, "intermediate": 512, "heads": 8, "kv_heads": 4, "head_dim": 32, "dtype": "bfloat16",
             "threads": 2, "experts": 2, "context": 40, "spread": 0.1}

    def with_rows(rows: list[dict]) -> Profile:
        d = base.to_dict()
        d["cpu"]["decode_layer"] = rows
        return Profile.from_dict(d)
    plan = _plan(accelerator="cpu", threads=2, slots=0, name="tiny-moe")
    sim = _decode_sim(4, hits=0.0, misses=2.0)
    before = predict(base, shape, plan, sim, 512, 16)
    after = predict(with_rows([{**layer, "cache": "cold", "median_s": 1.5e-3}]), shape, plan, sim, 512, 16)
    assert after.decode.dense_s == pytest.approx(before.decode.dense_s + 4 * 3e-4)
    assert after.decode.cpu_miss_s == before.decode.cpu_miss_s
    assert after.prefill.dense_s == pytest.approx(before.prefill.dense_s)
    # faster in the loop than its parts alone (the native step): the difference comes off
    faster = predict(with_rows([{**layer, "cache": "cold", "median_s": 1.0e-3}]), shape, plan, sim, 512, 16)
    assert faster.decode.dense_s == pytest.approx(before.decode.dense_s - 4 * 2e-4)
    # but a layer never costs less than its experts: the dense part goes to 0, not below
    floor = predict(with_rows([{**layer, "cache": "cold", "median_s": 1e-5}]), shape, plan, sim, 512, 16)
    assert floor.decode.dense_s == pytest.approx(before.decode.dense_s - 4 * 1e-3)
    # the plan's cache state picks its row: a warm row does not change a cold plan when a cold one exists
    both = with_rows([{**layer, "cache": "cold", "median_s": 1.5e-3}, {**layer, "cache": "warm", "median_s": 9e-3}])
    assert predict(both, shape, plan, sim, 512, 16).decode.dense_s == pytest.approx(after.decode.dense_s)
    gpu = _plan(accelerator="cuda:0", threads=2, slots=4, name="tiny-moe")
    assert predict(both, shape, gpu, sim, 512, 16).decode.dense_s == pytest.approx(
        predict(base, shape, gpu, sim, 512, 16).decode.dense_s)


def test_a_cpu_plan_with_slots_hits_in_the_same_fused_call_and_copies_at_the_measured_rate() -> None:
    shape = load_model_shape(str(TINY))
    profile = _paths_profile(None)  # cold
    plan = _plan(accelerator="cpu", threads=2, slots=4, name="tiny-moe")
    p = predict(profile, shape, plan, _decode_sim(4, hits=1.5, misses=0.5, copies=0.25), 512, 16)
    assert p.decode.hit_s == pytest.approx(4 * 2e-4 * 0.75) and p.decode.cpu_miss_s == pytest.approx(4 * 2e-4 * 0.25)
    copy = shape.expert_bytes / 8e9
    assert p.decode.background_copy_s == pytest.approx(4 * 0.25 * copy) == p.decode.copy_excess_s
    # Without a measured copy rate, a copy reads and writes every byte at the DRAM read rate.
    old = predict(_paths_profile(None, copy_gbps=None), shape, plan, _decode_sim(4, 1.5, 0.5, copies=0.25), 512, 16)
    assert old.decode.background_copy_s == pytest.approx(4 * 0.25 * 2 * shape.expert_bytes / (
        profile.memory_read_gbps(2) * 1e9))


def test_a_cpu_plan_pass_that_copies_a_miss_in_runs_through_torch() -> None:
    """transfer_min_tokens 1: a layer's pass with a miss copies it into a slot, then computes every expert
    from its slot with torch (`MoeLayer._pass`); a pass without one stays fused. 0.5 transfers of 2 experts
    per layer: a pass has one with probability 1 - 0.75^2, and then 0.5 / that many transfers."""
    shape = load_model_shape(str(TINY))
    profile = _paths_profile(None)
    plan = _plan(accelerator="cpu", threads=2, slots=4, name="tiny-moe", transfer=1, promote=False)
    p = predict(profile, shape, plan, _decode_sim(4, hits=1.5, misses=0.0, transfers=0.5), 512, 16)
    f = 1 - 0.75 ** 2
    copy = shape.expert_bytes / 8e9
    assert p.decode.hit_s == pytest.approx(4 * ((1 - f) * 2e-4 + f * (2 - 0.5 / f) * 3e-4))
    assert p.decode.transfer_s == pytest.approx(4 * 0.5 * (3e-4 + copy))
    assert p.decode.cpu_miss_s == 0
    # All hits: every pass is fused.
    allhit = predict(profile, shape, plan, _decode_sim(4, hits=2.0, misses=0.0), 512, 16)
    assert allhit.decode.hit_s == pytest.approx(4 * 2e-4)


def test_a_gpu_plan_computes_its_cpu_misses_through_run() -> None:
    shape = load_model_shape(str(TINY))
    plan = _plan(accelerator="cuda:0", threads=2, slots=4, name="tiny-moe")
    p = predict(_paths_profile(None), shape, plan, _decode_sim(4, hits=1.0, misses=1.0), 512, 16)
    assert p.decode.cpu_miss_s == pytest.approx(4 * 2.5e-4)
    # A profile without the paths' rows: each miss its own expert call, as before.
    q = predict(Profile.from_dict(PUBLISHED), shape, plan, _decode_sim(4, hits=1.0, misses=1.0), 512, 16)
    assert q.decode.cpu_miss_s == pytest.approx(
        4 * Profile.from_dict(PUBLISHED).cpu_expert_seconds(256, 512, "bfloat16", 1, 2))


# ---- quantized experts: bytes from the format contract, CPU times from int rows or scaled bf16 rows ----------
def test_int4_experts_without_int4_rows_take_the_bf16_rows_unscaled() -> None:
    shape = load_model_shape(str(TINY), experts="int4")
    assert shape.expert_bytes == 256 * 512 * 3 // 2 + 2 * 3 * 256 * 512 // 32  # contract: N*K/2 + 2*N*K/G
    plan = _plan(accelerator="cpu", threads=2, slots=0, name="tiny-moe")
    profile = _paths_profile(None)
    p = predict(profile, shape, plan, _decode_sim(4, hits=0.0, misses=2.0), 512, 16)
    assert p.decode.cpu_miss_s == pytest.approx(4 * 2e-4)  # fewer bytes, no faster: the kernels are bound by arithmetic
    assert p.memory_items["host"]["experts"] == 4 * 8 * shape.expert_bytes
    assert any(n.startswith("int4 experts: the profile has no int4 CPU rows") and "not scaled by bytes" in n
               for n in p.notes), p.notes
    # a GPU plan's CPU misses without path rows: one expert call each, the bf16 expert time
    gpu = predict(Profile.from_dict(PUBLISHED), shape, _plan(threads=2, slots=4, name="tiny-moe"),
                  _decode_sim(4, hits=1.0, misses=1.0), 512, 16)
    one = Profile.from_dict(PUBLISHED).cpu_expert_seconds(256, 512, "bfloat16", 1, 2)
    assert gpu.decode.cpu_miss_s == pytest.approx(4 * one)
    assert any("accelerator expert times from its bfloat16 rows" in n for n in gpu.notes)


def test_int4_experts_use_the_profiles_int4_rows_where_it_has_them() -> None:
    cpu = {**PUBLISHED["cpu"],
           "expert_ffn": [{"hidden": 256, "intermediate": 512, "dtype": "int4", "threads": 2, "tokens": 1,
                           "median_s": 7e-5, "spread": 0.1}],
           "moe_layer": [{"hidden": 256, "intermediate": 512, "dtype": "int4", "threads": 2, "path": "token",
                          "experts": 2, "tokens": 1, "cache": "cold", "median_s": 9e-5, "spread": 0.1}]}
    profile = Profile.from_dict({**PUBLISHED, "cpu": cpu})
    shape = load_model_shape(str(TINY), experts="int4")
    p = predict(profile, shape, _plan(accelerator="cpu", threads=2, slots=0, name="tiny-moe"),
                _decode_sim(4, hits=0.0, misses=2.0), 512, 16)
    assert p.decode.cpu_miss_s == pytest.approx(4 * 9e-5)  # the fused int4 row, unscaled
    assert any(n.startswith("int4 experts: CPU expert times from the profile's int4 rows") for n in p.notes)
    assert profile.cpu_expert_seconds(256, 512, "int4", 1, 2) == pytest.approx(7e-5)
    assert Profile.from_dict(profile.to_dict()).cpu.moe_layer == profile.cpu.moe_layer  # int rows round-trip


def test_int8_and_int4_shrink_what_a_miss_reads_and_a_slot_holds() -> None:
    bf16, int8, int4 = (load_model_shape("mixtral", experts=f) for f in ("bfloat16", "int8", "int4"))
    assert bf16.expert_bytes == 3 * 4096 * 14336 * 2
    assert int8.expert_bytes == 3 * 4096 * 14336 + 2 * 3 * 4096 * 14336 // 32
    assert int4.expert_bytes == 3 * 4096 * 14336 // 2 + 2 * 3 * 4096 * 14336 // 32
    assert decode_bytes(int4, 512) < decode_bytes(int8, 512) < decode_bytes(bf16, 512)


def test_a_gpu_plans_transfers_overlap_their_copies_and_computes(profile, olmoe_trace, monkeypatch) -> None:
    """The runtime double-buffers a CUDA plan's transfers (the next copy runs while this one is computed):
    a layer's transfers cost the first copy, then the larger of each copy and each compute, then the last
    compute; never less than the larger of all copies and all computes, never more than their sum, which is
    what one buffer (copy, then compute) would cost."""
    import planner.cost_model as cost_model
    from planner.cost_model import pipelined_transfers_s

    assert pipelined_transfers_s(4, 4.0, 2.0) == pytest.approx(1.0 + 0.5 + 3 * 1.0)  # copies dominate
    assert pipelined_transfers_s(3, 1.5, 3.0) == pytest.approx(0.5 + 1.0 + 2 * 1.0)  # computes dominate
    assert pipelined_transfers_s(1, 1.0, 2.0) == 3.0  # one transfer: nothing to overlap
    assert pipelined_transfers_s(0.4, 0.4, 0.8) == pytest.approx(1.2)  # a mean of passes with none or one
    for n, c, k in [(2, 1.0, 1.0), (8, 5.0, 0.3), (16, 0.2, 4.0)]:
        assert max(c, k) <= pipelined_transfers_s(n, c, k) <= c + k
    shape, trace = olmoe_trace
    plan = _plan(transfer=2, promote=False)  # prefill misses of 2 tokens or more are computed on the GPU
    sim = replay(trace, plan, shape)
    double = predict(profile, shape, plan, sim, context=512, prompt_tokens=64)
    monkeypatch.setattr(cost_model, "TRANSFER_BUFFERS", 1)
    single = predict(profile, shape, plan, sim, context=512, prompt_tokens=64)
    assert 0 < double.prefill.transfer_s < single.prefill.transfer_s
    assert double.prefill.total_s < single.prefill.total_s
    cpu = _plan("cpu", transfer=2, promote=False)  # on the CPU copy and compute run one after the other
    cpu_sim = replay(trace, cpu, shape)
    monkeypatch.setattr(cost_model, "TRANSFER_BUFFERS", 2)
    a = predict(profile, shape, cpu, cpu_sim, context=512, prompt_tokens=64).prefill.transfer_s
    monkeypatch.setattr(cost_model, "TRANSFER_BUFFERS", 1)
    assert predict(profile, shape, cpu, cpu_sim, context=512, prompt_tokens=64).prefill.transfer_s == a


def test_cache_bookkeeping_is_charged_per_layer_from_the_profile(olmoe_trace) -> None:
    """Each MoE layer that can change its cache runs `route_pass` once a pass on the host CPU: the profile's
    `cpu.policy_step` rows for the plan's policy at the model's width, interpolated over the layer's slots,
    times the layers, in every pass that has tokens. A profile without rows for that policy and width charges
    nothing and says so; a plan whose layers cache nothing has no bookkeeping to charge, and a layer
    without slots whose rule transfers only prefill misses skips it for a decode token, as the runtime does."""
    shape, trace = olmoe_trace
    rows = [{"policy": "lru", "experts": shape.num_experts, "top_k": shape.top_k, "slots": n, "median_s": t,
             "spread": 0.0} for n, t in ((1, 40e-6), (16, 30e-6), (32, 20e-6))]
    measured = Profile.from_dict({**PUBLISHED, "cpu": {**PUBLISHED["cpu"], "policy_step": rows}})
    plan = _plan(slots=24)
    sim = replay(trace, plan, shape)
    without = predict(Profile.from_dict(PUBLISHED), shape, plan, sim, context=512, prompt_tokens=64)
    charged = predict(measured, shape, plan, sim, context=512, prompt_tokens=64)
    per_pass = shape.num_moe_layers * 25e-6  # 24 slots: halfway between the rows at 16 and 32
    assert without.decode.policy_s == 0 and any("policy_step" in n for n in without.notes)
    assert charged.decode.policy_s == pytest.approx(per_pass)
    assert not any("policy_step" in n for n in charged.notes)
    # on the critical path (the background copies beyond the pass's time shrink by as much, if any)
    assert (charged.decode.total_s - charged.decode.copy_excess_s
            == pytest.approx(without.decode.total_s - without.decode.copy_excess_s + per_pass))
    assert charged.prefill.policy_s == pytest.approx(per_pass * len(trace.prefill_passes()))

    markov = dataclasses.replace(plan, cache=dataclasses.replace(plan.cache, policy="markov"))
    other = predict(measured, shape, markov, replay(trace, markov, shape), context=512, prompt_tokens=64)
    assert other.decode.policy_s == 0 and any("policy markov" in n for n in other.notes)  # rows are per policy

    nothing = _plan(accelerator="cpu", slots=0, promote=False, transfer=0)
    assert nothing.miss.rule.ever_on_accelerator is False
    idle = predict(measured, shape, nothing, replay(trace, nothing, shape), context=512, prompt_tokens=64)
    assert idle.decode.policy_s == 0 and not any("policy_step" in n for n in idle.notes)

    prefill_only = _plan(slots=0, promote=False, transfer=32)  # transfers prefill misses of 32+ tokens
    assert not prefill_only.miss.rule.on_accelerator(1) and prefill_only.miss.rule.ever_on_accelerator
    split = predict(measured, shape, prefill_only, replay(trace, prefill_only, shape), context=512, prompt_tokens=64)
    assert split.decode.policy_s == 0
    assert split.prefill.policy_s == pytest.approx(shape.num_moe_layers * 40e-6 * len(trace.prefill_passes()))
