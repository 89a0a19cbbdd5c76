"""`moeplan explain` end to end, in-process through the CLI, on a published profile."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from planner.cli import main
PUBLISHED = Path(__file__).resolve().parent / "data" / "desktop-rtx4070-published.yaml"


@pytest.fixture()
def files(tmp_path):
    profile = PUBLISHED
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({
        "version": 1, "model": {"name": "olmoe-1b-7b", "dtype": "bfloat16"},
        "hardware": {"accelerator": "cuda:0", "cpu_threads": 8},
        "cache": {"slots": 24, "policy": "lru"},
        "miss": {"compute": "cpu", "transfer_min_tokens": 32, "promote": True}}))
    return plan, profile


def _explain(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["explain", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_on_the_recorded_trace(files, capsys) -> None:
    plan, profile = files
    code, out, _ = _explain(capsys, str(plan), "--profile", str(profile), "--context", "256",
                            "--prompt-tokens", "32", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["model"] == "olmoe-1b-7b" and d["fits"] is True
    assert "olmoe-1b-7b-decode-299.jsonl (recorded)" in d["trace_source"]
    assert d["decode_tokens_per_s"] > 0 and d["prefill_tokens_per_s"] > 0 and 0 < d["hit_rate"] < 1
    assert set(d["memory_bytes"]) == {"accelerator", "host"}
    assert d["memory_bytes"]["accelerator"] == sum(d["memory_items"]["accelerator"].values())
    assert d["decode_breakdown_s"]["total_s"] == pytest.approx(1 / d["decode_tokens_per_s"])


def test_the_table_names_every_item_and_the_verdict(files, capsys) -> None:
    plan, profile = files
    code, out, _ = _explain(capsys, str(plan), "--profile", str(profile), "--prompt-tokens", "16")
    assert code == 0
    for label in ("dense + KV + overhead", "misses on CPU", "background copies", "overlap", "accelerator",
                  "expert_slots", "verdict  fits"):
        assert label in out


def test_another_model_without_a_recorded_trace_gets_a_synthetic_one(files, capsys, tmp_path) -> None:
    pytest.importorskip("planner.routing.synthetic")
    _, profile = files
    plan = tmp_path / "mixtral.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "model": {"name": "mixtral"},
                                    "hardware": {"accelerator": "cuda:0", "cpu_threads": 8},
                                    "cache": {"slots": 2, "policy": "lru"}}))
    code, out, _ = _explain(capsys, str(plan), "--profile", str(profile), "--prompt-tokens", "16", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["trace_source"].startswith("synthetic") and d["model"] == "mixtral-8x7b"


def test_a_plan_too_big_for_the_gpu(files, capsys, tmp_path) -> None:
    _, profile = files
    plan = tmp_path / "big.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "model": {"name": "olmoe-1b-7b"},
                                    "hardware": {"accelerator": "cuda:0", "cpu_threads": 8},
                                    "cache": {"slots": 64, "policy": "lru"}}))
    code, out, _ = _explain(capsys, str(plan), "--profile", str(profile), "--prompt-tokens", "8", "--json")
    d = json.loads(out)
    assert code == 0 and d["fits"] is False
    assert d["memory_bytes"]["accelerator"] > d["memory_limit_bytes"]["accelerator"]
    assert any(n.startswith("accelerator: needs") for n in d["notes"])


def test_user_errors_are_one_line(files, capsys, tmp_path, monkeypatch) -> None:
    plan, profile = files
    code, _, err = _explain(capsys, str(plan), "--profile", str(tmp_path / "missing.yaml"))
    assert code == 1 and "missing.yaml: no such profile file" in err and err.count("\n") == 1
    code, _, err = _explain(capsys, str(plan), "--profile", str(profile), "--model", "nope")
    assert code == 1 and "nope: not a known model" in err
    monkeypatch.setattr("socket.gethostname", lambda: "no-such-host-xyz")
    code, _, err = _explain(capsys, str(plan))
    assert code == 1 and "no-such-host-xyz.yaml" in err and "moeplan profile" in err


def test_without_profile_a_plan_is_explained_on_the_profile_it_was_tuned_on(capsys, tmp_path, monkeypatch) -> None:
    """A shipped GPU plan names its profile (`hardware.profile`): without --profile, explain predicts on that
    host (where the project has the profile), not on the machine it runs on; else on this host's."""
    from planner.paths import PLANS

    monkeypatch.setattr("socket.gethostname", lambda: "no-such-host-xyz")
    code, out, _ = _explain(capsys, str(PLANS / "rtx4070-int4.yaml"), "--json")
    d = json.loads(out)
    assert code == 0 and d["profile"] == "rtx4070-64gb" and d["fits"] is True
    assert d["profile_source"] == "profiles/rtx4070-64gb.yaml (the one the plan was tuned on)"
    code, out, _ = _explain(capsys, str(PLANS / "rtx4070-int4.yaml"))
    assert code == 0 and "profile    profiles/rtx4070-64gb.yaml (the one the plan was tuned on)" in out
    # a profile the project does not have: this host's, and here there is none
    plan = tmp_path / "elsewhere.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "model": {"name": "olmoe-1b-7b"},
                                    "hardware": {"accelerator": "cuda:0", "cpu_threads": 8, "profile": "gone"},
                                    "cache": {"slots": 8, "policy": "lru"}}))
    code, _, err = _explain(capsys, str(plan))
    assert code == 1 and "no-such-host-xyz.yaml: no profile for this host" in err
