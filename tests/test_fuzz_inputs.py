"""Fuzzing the loaders: any mutated plan, profile, trace or config.json is accepted or rejected with a
UserError subclass; never another exception, never a hang (per-example deadline, see input_mutations).

A bounded run here; `bench/fuzz_inputs.py --examples N` runs the same strategies longer.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

import input_mutations as im

EXAMPLES = {"plan": 150, "profile": 120, "profile_dict": 150, "trace": 150, "config": 150}


@pytest.fixture(scope="module")
def workspace():
    ws = im.Workspace()
    yield ws
    ws.close()


@pytest.mark.parametrize("name", list(im.LOADERS))
def test_loader_accepts_or_rejects_cleanly(name, workspace):
    @settings(max_examples=EXAMPLES[name], deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(im.strategy(name))
    def check(data):
        result = im.outcome(workspace, name, data)
        assert not result.startswith("crashed"), result

    check()


def test_valid_documents_are_accepted(workspace):
    """The mutations start from documents the loaders accept: otherwise the fuzzing proves little."""
    import json

    import yaml

    assert im.outcome(workspace, "plan", yaml.safe_dump(im.VALID_PLAN).encode()) == "accepted"
    assert im.outcome(workspace, "profile", im.PROFILE_FILE.read_bytes()) == "accepted"
    assert im.outcome(workspace, "profile_dict", im.valid_profile()) == "accepted"
    trace = ("\n".join(json.dumps(x) for x in im.VALID_TRACE) + "\n").encode()
    assert im.outcome(workspace, "trace", trace) == "accepted"
    assert im.outcome(workspace, "config", json.dumps(im.VALID_CONFIG).encode()) == "accepted"


def test_alias_bomb_is_rejected_fast(workspace):
    import time

    import yaml

    text = yaml.safe_dump(im.VALID_PLAN, sort_keys=False) + "provenance:\n  " + im.alias_bomb().replace("\n", "\n  ")
    start = time.perf_counter()
    assert im.outcome(workspace, "plan", text.encode()) == "rejected"
    assert im.outcome(workspace, "profile", im.alias_bomb().encode()) == "rejected"
    assert time.perf_counter() - start < 5
