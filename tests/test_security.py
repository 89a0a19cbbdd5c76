"""Safe inputs only: YAML through the safe loader, weights from safetensors only, no code named in a plan,
and output flags write exactly the path given."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.cli import main
from planner.profile import Profile, ProfileError
from runtime.contracts.traces import load_trace
from runtime.errors import ModelError, PlanError
from runtime.loader import check_model_dir
from runtime.plan import Plan

PLAN = "version: 1\nmodel: {{name: {name}, path: {path}, dtype: float32}}\nhardware: {{accelerator: cpu}}\n"


def _attack(sentinel: Path) -> str:
    return f"!!python/object/apply:os.system ['touch {sentinel}']"


def test_python_tags_in_a_plan_are_rejected_and_never_run(tmp_path):
    sentinel = tmp_path / "pwned"
    for text in (f"version: 1\nprovenance: {_attack(sentinel)}\n", f"{_attack(sentinel)}\n",
                 "version: 1\nmodel: !!python/object:runtime.plan.ModelSpec {name: x}\n"):
        with pytest.raises(PlanError, match="not valid YAML"):
            Plan.from_yaml(text, source="p.yaml")
    assert not sentinel.exists()


def test_python_tags_in_a_profile_are_rejected_and_never_run(tmp_path):
    sentinel = tmp_path / "pwned"
    with pytest.raises(ProfileError, match="not valid YAML"):
        Profile.from_yaml(f"version: 1\nname: {_attack(sentinel)}\n")
    assert not sentinel.exists()


def test_a_trace_header_is_json_data_only(tmp_path):
    sentinel = tmp_path / "pwned"
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"trace": 1, "model": _attack(sentinel), "num_layers": 1, "num_experts": 2,
                                 "top_k": 1, "source": "recorded"}) + "\n"
                     + json.dumps({"pass": 0, "phase": "decode", "tokens": 1, "experts": [[[1]]]}) + "\n")
    assert load_trace(trace).header.model.startswith("!!python/object")  # a string, nothing more
    assert not sentinel.exists()


def test_pickle_checkpoints_are_refused(checkpoint, tmp_path):
    folder, _ = checkpoint("mixtral")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"a pickle that must never be unpickled")
    with pytest.raises(ModelError, match=r"no \*\.safetensors weights \(moeplan reads safetensors only\)"):
        check_model_dir(pickled)


@pytest.mark.parametrize("section,text", [
    ("hardware", "hardware: {accelerator: 'torch.device'}"),
    ("model", "model: {dtype: torch.float64}"),
    ("cache", "cache: {policy: 'collections.OrderedDict'}"),
    ("top", "experts_implementation: my_module.forward"),
    ("miss", "miss: {compute: 'os.system'}"),
])
def test_a_plan_cannot_name_python_code(section, text):
    with pytest.raises(PlanError):
        Plan.from_yaml(f"version: 1\n{text}\n")


def test_trace_out_writes_exactly_the_given_path(checkpoint, tmp_path, capsys):
    """The model name in the plan (which goes into the trace header) never steers where files go."""
    folder, _ = checkpoint("mixtral")
    work = tmp_path / "work"
    work.mkdir()
    plan = work / "plan.yaml"
    plan.write_text(PLAN.format(name="../../escaped", path=folder))
    before = {p for p in tmp_path.rglob("*")}
    out = work / "chosen" / "routing.jsonl"
    assert main(["run", str(plan), "--max-new-tokens", "2", "--json", "--trace-out", str(out)]) == 0
    created = {p for p in tmp_path.rglob("*")} - before
    assert created == {out, out.parent}
    assert load_trace(out).header.model == "../../escaped"
