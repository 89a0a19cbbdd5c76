"""The whole pipeline on the embedded model: profile, tune, run; and its recorded routing is not uniform."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.cli import main
from runtime.plan import Plan

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "models" / "tiny-moe"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("pipeline")
    profile, plan, trace = work / "profile.yaml", work / "plan.yaml", work / "trace.jsonl"
    assert main(["profile", "--quick", "--model", str(TINY), "--out", str(profile), "--no-progress",
                 "--threads", "1,2", "--tokens", "1,8", "--contexts", "128", "--stream-mb", "64",
                 "--pool-mb", "64"]) == 0
    assert main(["tune", "--model", str(TINY), "--profile", str(profile), "--expert-budget-fraction", "0.25",
                 "--trials", "16", "--out", str(plan), "--no-progress"]) == 0
    return profile, plan, trace


def test_profile_tune_run(pipeline, capsys):
    _, plan_path, trace = pipeline
    plan = Plan.load(plan_path)
    assert plan.predicted and plan.predicted["decode_tokens_per_s"] > 0
    assert plan.provenance and plan.provenance.get("seed") == 0
    capsys.readouterr()
    assert main(["run", str(plan_path), "--model", str(TINY), "--prompt", "def fibonacci(n):",
                 "--max-new-tokens", "24", "--json", "--trace-out", str(trace)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"].strip() and len(out["generated_ids"]) == 24
    assert out["predicted"] == plan.predicted, "run reports the plan's predictions beside its measurements"
    assert out["cache"]["hits"] + out["cache"]["misses"] > 0


def test_recorded_routing_is_not_uniform(pipeline):
    from planner.routing.statistics import format_table, trace_stats
    from runtime.contracts.traces import load_trace

    trace = load_trace(pipeline[2])
    stats = trace_stats(trace)
    experts, k = trace.header.num_experts, trace.header.top_k
    uniform_reuse = k / experts  # a token's expert was also the previous token's, under uniform routing
    assert trace.header.num_experts == 8 and len(trace.passes) == 24
    assert stats.mean_next_token_reuse > uniform_reuse + 0.1, format_table(stats)
