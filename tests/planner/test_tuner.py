"""`moeplan tune` end to end on a small random checkpoint and trace: reproducible, resumable, interruptible,
memory-feasible plans that `Plan.load` and `moeplan explain` accept; the hit curves behind the split are exact."""
from __future__ import annotations

import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from planner import cli
from planner.catalog import load_model_shape
from planner.commands.tune import parse_bytes
from planner.profile import Profile
from planner.routing.simulator import simulate
from runtime.contracts.traces import load_trace
from planner.tune.evaluation import NO_SLOTS_ON_CPU, Evaluator, cache_capacity
from planner.tune.space import Choice
from runtime.contracts.cache_policy import MissRule
from runtime.plan import Plan

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = Path(__file__).resolve().parent / "data" / "desktop-rtx4070-published.yaml"


@pytest.fixture(scope="module")
def model_dir(checkpoint) -> Path:
    return checkpoint("mixtral")[0]  # 3 MoE layers x 8 experts, top-2


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory, model_dir) -> Path:
    """A skewed random trace: one prefill pass of 24 tokens and 80 decode passes."""
    shape = load_model_shape(str(model_dir))
    L, E, K = shape.num_moe_layers, shape.num_experts, shape.top_k
    rng = random.Random(1)
    weights = [1.0 / (e + 1) ** 1.2 for e in range(E)]

    def token() -> list[int]:
        out: list[int] = []
        while len(out) < K:
            e = rng.choices(range(E), weights=weights)[0]
            if e not in out:
                out.append(e)
        return out

    lines = [json.dumps({"trace": 1, "model": shape.name, "num_layers": L, "num_experts": E, "top_k": K,
                         "source": "recorded"})]
    for i, tokens in enumerate([24] + [1] * 80):
        lines.append(json.dumps({"pass": i, "phase": "prefill" if i == 0 else "decode", "tokens": tokens,
                                 "experts": [[token() for _ in range(tokens)] for _ in range(L)]}))
    path = tmp_path_factory.mktemp("trace") / "small.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def cpu_profile(tmp_path_factory) -> Path:
    """The published desktop profile without its GPU: `tune` must write accelerator: cpu plans."""
    data = yaml.safe_load(PUBLISHED.read_text())
    data["accelerator"] = None
    data["name"] = "desktop-cpu-only"
    path = tmp_path_factory.mktemp("profile") / "cpu.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tune(model_dir: Path, trace: Path, profile: Path, out: Path, *extra: str) -> int:
    return cli.main(["tune", "--model", str(model_dir), "--trace", str(trace), "--profile", str(profile),
                     "--out", str(out), "--no-progress", *extra])


def without_date(plan: Plan) -> dict:
    d = plan.to_dict()
    d["provenance"] = {k: v for k, v in d["provenance"].items() if k != "date"}
    return d


def test_seeded_study_is_reproducible_and_the_plan_loads_and_explains(model_dir, trace_file, cpu_profile,
                                                                     tmp_path, capsys, caplog) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    caplog.set_level(logging.INFO, logger="planner.commands.tune")
    assert tune(model_dir, trace_file, cpu_profile, a, "--trials", "25", "--seed", "3",
                "--expert-budget-fraction", "0.25") == 0
    budget_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("budget:"))
    assert "slots" not in budget_line  # a CPU plan holds none: the fraction is room in memory there
    assert tune(model_dir, trace_file, cpu_profile, b, "--trials", "25", "--seed", "3",
                "--expert-budget-fraction", "0.25") == 0
    pa, pb = Plan.load(a), Plan.load(b)
    assert without_date(pa) == without_date(pb)
    assert pa.hardware.accelerator == "cpu"  # the profile has no accelerator
    shape = load_model_shape(str(model_dir))
    # without an accelerator a slot would be a second copy in host memory, computed as a miss is: none,
    # whatever the budget would hold, and no cache knob set that could not matter
    assert sum(pa.cache.slots_per_layer(shape.num_moe_layers, shape.num_experts)) == 0
    assert (pa.cache.policy, pa.cache.preload, pa.miss.promote, pa.prefetch.lookahead) == ("lru", None, False, 0)
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "hit_rate", "accelerator_bytes", "host_bytes"):
        assert key in pa.predicted
    assert pa.provenance["trials"] == 25 and pa.provenance["seed"] == 3
    assert pa.provenance["trace_source"] == "recorded" and len(pa.provenance["profile_sha256"]) == 64
    capsys.readouterr()
    assert cli.main(["explain", str(a), "--model", str(model_dir), "--trace", str(trace_file),
                     "--profile", str(cpu_profile), "--json"]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert explained["fits"] is True
    assert explained["decode_tokens_per_s"] == pytest.approx(pa.predicted["decode_tokens_per_s"], rel=1e-3)


def test_gpu_profile_gives_gpu_plans_within_the_vram_budget(model_dir, trace_file, tmp_path) -> None:
    shape = load_model_shape(str(model_dir))
    profile = Profile.load(PUBLISHED)
    cap = cache_capacity(profile, shape, "cuda:0", 512, 128, None)
    budget = cap.fixed_bytes + 5 * shape.expert_bytes  # room for exactly 5 slots
    out = tmp_path / "gpu.yaml"
    assert tune(model_dir, trace_file, PUBLISHED, out, "--trials", "15", "--vram-budget", str(budget)) == 0
    plan = Plan.load(out)
    assert plan.hardware.accelerator == "cuda:0"
    assert sum(plan.cache.slots_per_layer(shape.num_moe_layers, shape.num_experts)) <= 5
    assert plan.predicted["accelerator_bytes"] <= budget


def test_infeasible_budget_is_one_clear_line(model_dir, trace_file, tmp_path, capsys) -> None:
    out = tmp_path / "never.yaml"
    assert tune(model_dir, trace_file, PUBLISHED, out, "--trials", "5", "--vram-budget", "1MB") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(r"moeplan tune: error: accelerator memory: the plan needs [\d.]+ GiB \(\d+ bytes\) before any "
                    r"expert slot \(dense_weights .*\) but has 0\.00 GiB \(1000000 bytes\)$", err), err
    assert not out.exists()


def test_resumed_study_adds_up(model_dir, trace_file, cpu_profile, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    out = tmp_path / "plan.yaml"
    args = ("--storage", storage, "--study", "s1")
    assert tune(model_dir, trace_file, cpu_profile, out, "--trials", "6", *args) == 0
    assert Plan.load(out).provenance["trials"] == 6
    assert tune(model_dir, trace_file, cpu_profile, out, "--trials", "4", *args) == 0
    prov = Plan.load(out).provenance
    assert (prov["trials"], prov["trials_this_run"]) == (10, 4)
    import optuna
    study = optuna.load_study(study_name="s1", storage=storage)
    assert len(study.trials) == 10
    # The same study name for another workload is refused rather than mixed.
    assert tune(model_dir, trace_file, cpu_profile, out, "--trials", "1", "--context", "64", *args) == 1


def test_journal_storage_path_is_accepted(model_dir, trace_file, cpu_profile, tmp_path) -> None:
    out = tmp_path / "plan.yaml"
    journal = tmp_path / "study.journal"
    assert tune(model_dir, trace_file, cpu_profile, out, "--trials", "3", "--storage", str(journal)) == 0
    assert tune(model_dir, trace_file, cpu_profile, out, "--trials", "2", "--storage", str(journal)) == 0
    assert Plan.load(out).provenance["trials"] == 5


def test_ctrl_c_writes_the_best_plan_so_far_and_exits_130(model_dir, trace_file, cpu_profile, tmp_path) -> None:
    out = tmp_path / "interrupted.yaml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "planner.cli", "tune", "--model", str(model_dir), "--trace", str(trace_file),
         "--profile", str(cpu_profile), "--out", str(out), "--trials", "100000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = bytearray()

    def read() -> None:
        while chunk := proc.stderr.read1(4096):
            seen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not re.search(rb"\| *([3-9]|\d\d+)/100000", bytes(seen)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, bytes(seen).decode(errors="replace")
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    reader.join(timeout=5)
    assert rc == 130, bytes(seen).decode(errors="replace")
    plan = Plan.load(out)
    assert plan.provenance["interrupted"] is True and plan.provenance["trials"] >= 3


def test_no_slot_is_one_plan_and_a_cpu_plan_gets_none(model_dir) -> None:
    """With no slot the cache knobs cannot matter: every such choice is one grid point. And without an
    accelerator no slot is offered, whatever the memory or the budget would hold."""
    a = Choice(0, "static", True, 2, "cpu", 32, True, 1).canonical()
    b = Choice(0, "fifo", False, 2, "cpu", 32, False, 0).canonical()
    assert a == b and (a.policy, a.preload, a.promote, a.lookahead) == ("lru", False, False, 0)
    assert a.transfer_min_tokens == 32  # still matters: a miss of many tokens may be copied to be computed
    assert Choice(3, "fifo", False, 2, "cpu", 0, True, 1).canonical().policy == "fifo"
    shape = load_model_shape(str(model_dir))
    profile = Profile.load(PUBLISHED)
    gpu = cache_capacity(profile, shape, "cuda:0", 512, 24, None)
    assert gpu.device == "accelerator" and gpu.max_slots > 0
    roomy = gpu.fixed_bytes + 100 * shape.expert_bytes
    cpu = cache_capacity(profile, shape, "cpu", 512, 24, roomy)
    assert cpu.device == "host" and cpu.max_slots == 0


def test_curves_are_exact_for_any_split(model_dir, trace_file) -> None:
    """The DP's objective equals the simulator's hits for the split it returns (layers are independent)."""
    shape = load_model_shape(str(model_dir))
    profile = Profile.load(PUBLISHED)
    trace = load_trace(trace_file)
    cap = cache_capacity(profile, shape, "cuda:0", 512, 24, None)
    ev = Evaluator(profile, shape, trace, accelerator="cuda:0", context=512, prompt_tokens=24, capacity=cap)
    for policy in ("lru", "lfu", "fifo", "adaptive", "markov", "static"):
        for preload in (False, True):
            for rule in (MissRule("cpu", 0, True), MissRule("cpu", 8, False), MissRule("accelerator", 0, False)):
                choice = Choice(7, policy, preload, 2, rule.compute, rule.transfer_min_tokens, rule.promote, 0)
                choice = choice.canonical()
                alloc = ev.allocation(choice)
                pre = ev.preload_for(alloc.slots) if choice.preload else None
                rule = MissRule(choice.miss_compute, choice.transfer_min_tokens, choice.promote)
                sim = simulate(trace, list(alloc.slots), choice.policy, pre, rule)
                assert sim.hits == alloc.value, (choice, alloc)


def test_measure_reranks_with_the_runtime(model_dir, trace_file, cpu_profile, tmp_path) -> None:
    out = tmp_path / "measured.yaml"
    assert tune(model_dir, trace_file, cpu_profile, out, "--trials", "8", "--measure", "2") == 0
    plan = Plan.load(out)
    assert plan.predicted["measured_decode_tokens_per_s"] > 0
    assert len(plan.predicted["measured"]) == 2
    assert plan.model.path == str(model_dir)


def test_report_writes_plots_and_summary(model_dir, trace_file, cpu_profile, tmp_path) -> None:
    report = tmp_path / "report"
    assert tune(model_dir, trace_file, cpu_profile, tmp_path / "p.yaml", "--trials", "12", "--report", str(report)) == 0
    for name in ("history.png", "importances.png", "hit_rate.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (report / "summary.md").read_text()
    assert "Pareto front" in summary and "accelerator cpu; no expert slots" in summary and NO_SLOTS_ON_CPU in summary


@pytest.mark.parametrize("text, value", [("12884901888", 12884901888), ("12GB", 12 * 10**9), ("12GiB", 12 * 2**30),
                                         ("1.5 GiB", 3 * 2**29), ("512MiB", 512 * 2**20)])
def test_vram_budget_sizes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


def test_vram_budget_rejects_nonsense() -> None:
    from runtime.errors import UserError
    with pytest.raises(UserError, match=r"--vram-budget: '12 parsecs' is not a size"):
        parse_bytes("12 parsecs")


def test_sigkilled_study_resumes_with_no_completed_trial_lost(model_dir, trace_file, cpu_profile, tmp_path) -> None:
    """A worker killed with SIGKILL (no handler runs) loses only the trial it was in."""
    import optuna

    def completed(storage: str) -> int:
        study = optuna.load_study(study_name="k", storage=storage)
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)

    storage = f"sqlite:///{tmp_path / 'killed.db'}"
    out = tmp_path / "plan.yaml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "planner.cli", "tune", "--model", str(model_dir), "--trace", str(trace_file),
         "--profile", str(cpu_profile), "--out", str(out), "--trials", "100000", "--storage", storage,
         "--study", "k", "--no-progress"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, deadline = 0, time.monotonic() + 120
    while seen < 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            seen = completed(storage)
        except Exception:  # the study or its tables are not there yet, or the database is busy
            continue
    proc.kill()
    proc.wait(timeout=30)
    assert seen >= 5, "the worker did not complete 5 trials in time"
    before = completed(storage)
    assert before >= seen, "a completed trial was lost"
    assert tune(model_dir, trace_file, cpu_profile, out, "--trials", "3", "--storage", storage, "--study", "k") == 0
    assert completed(storage) == before + 3
    assert Plan.load(out).provenance["trials"] == before + 3


def test_tune_experts_int4_plans_for_int4_bytes_and_writes_plan_version_2(model_dir, trace_file, tmp_path,
                                                                         capsys) -> None:
    """The same accelerator budget holds several times as many int4 slots as full-width ones; the plan records
    the format as model.experts (schema 2), and explain counts the int4 bytes and says how it timed them."""
    from runtime.contracts.expert_format import expert_bytes

    bf16 = load_model_shape(str(model_dir))
    int4 = load_model_shape(str(model_dir), experts="int4")
    assert int4.expert_bytes == expert_bytes("int4", bf16.hidden, bf16.expert_intermediate)
    profile = Profile.load(PUBLISHED)
    cap = cache_capacity(profile, int4, "cuda:0", 512, 128, None)
    budget = cap.fixed_bytes + 7 * int4.expert_bytes  # 7 int4 slots
    out = tmp_path / "int4.yaml"
    assert tune(model_dir, trace_file, PUBLISHED, out, "--trials", "15", "--vram-budget", str(budget),
                "--experts", "int4") == 0
    plan = Plan.load(out)
    assert plan.version == 2 and plan.model.experts == "int4" and "experts: int4" in out.read_text()
    assert plan.predicted["accelerator_bytes"] <= budget
    assert plan.predicted["host_bytes"] >= int4.expert_bytes_total
    capsys.readouterr()
    assert cli.main(["explain", str(out), "--model", str(model_dir), "--trace", str(trace_file), "--profile",
                     str(PUBLISHED), "--vram-budget", str(budget), "--json"]) == 0
    explained = json.loads(capsys.readouterr().out)
    assert explained["fits"]
    assert explained["memory_items"]["host"]["experts"] == int4.expert_bytes_total
    assert explained["memory_items"]["accelerator"]["expert_slots"] == sum(plan.cache.slots) * int4.expert_bytes
    assert any(n.startswith("int4 experts:") for n in explained["notes"])
    # the same budget in the checkpoint's dtype: fewer slots fit, and no model.experts is written
    plain = tmp_path / "bf16.yaml"
    assert tune(model_dir, trace_file, PUBLISHED, plain, "--trials", "15", "--vram-budget", str(budget)) == 0
    bf16_plan = Plan.load(plain)
    assert bf16_plan.model.experts is None and "experts:" not in plain.read_text().split("hardware:")[0]
    plain_slots = cache_capacity(profile, bf16, "cuda:0", 512, 128, budget).max_slots
    assert sum(bf16_plan.cache.slots) <= plain_slots < 7


def test_tune_experts_rejects_an_unknown_format(model_dir, trace_file, tmp_path) -> None:
    with pytest.raises(SystemExit) as err:
        tune(model_dir, trace_file, PUBLISHED, tmp_path / "x.yaml", "--experts", "int3")
    assert err.value.code == 2
