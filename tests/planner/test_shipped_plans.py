"""The shipped GPU plans fit the cards they were tuned for, with the accelerator reserve kept free."""
from __future__ import annotations

import json

import pytest

from planner.catalog import load_model_shape
from planner.cli import main
from planner.paths import PLANS, PROFILES
from runtime.contracts.memory import ACCELERATOR_RESERVE
from runtime.contracts.schedule import TRANSFER_BUFFERS
from runtime.plan import Plan


@pytest.mark.parametrize("name", ["rtx4070", "rtx4090", "rtx3060-12gb"])
def test_shipped_gpu_plan_fits_with_the_reserve(name, capsys):
    assert main(["explain", str(PLANS / f"{name}.yaml"), "--profile", str(PROFILES / f"{name}.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"], out["notes"]
    accelerator = out["memory_items"]["accelerator"]
    assert accelerator["reserve"] >= ACCELERATOR_RESERVE
    # the two transfer buffers, where the plan computes misses on the GPU (transfers), else none
    plan = Plan.load(PLANS / f"{name}.yaml")
    buffers = TRANSFER_BUFFERS * load_model_shape(plan.model.name).expert_bytes
    assert accelerator["transfer_scratch"] == (buffers if plan.miss.rule.ever_on_accelerator else 0)
    assert out["memory_bytes"]["accelerator"] <= out["memory_limit_bytes"]["accelerator"]


def test_shipped_int4_mixtral_plan_fits_the_64gb_rtx4070_host_and_card(capsys):
    """plans/rtx4070-int4.yaml: Mixtral-8x7B with int4 experts (`tune --experts int4`) against the 64 GB
    variant of the RTX 4070 profile, which no bf16 plan fits (its experts alone exceed the host)."""
    from planner.profile import Profile

    plan = Plan.load(PLANS / "rtx4070-int4.yaml")
    assert plan.version == 2 and plan.model.experts == "int4" and plan.model.dtype == "bfloat16"
    profile = PROFILES / "rtx4070-64gb.yaml"
    assert main(["explain", str(PLANS / "rtx4070-int4.yaml"), "--profile", str(profile), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"], out["notes"]
    int4 = load_model_shape("mixtral", experts="int4")
    assert out["memory_items"]["host"]["experts"] == int4.expert_bytes_total
    for device in ("accelerator", "host"):
        assert out["memory_bytes"][device] <= out["memory_limit_bytes"][device]
    assert out["memory_items"]["accelerator"]["reserve"] >= ACCELERATOR_RESERVE
    assert out["memory_limit_bytes"]["host"] == Profile.load(profile).host_memory_bytes == 64 * 2**30
    assert any(n.startswith("int4 experts:") for n in out["notes"])
    # the same host cannot hold Mixtral's bf16 experts: the reason for the int4 plan
    assert load_model_shape("mixtral").expert_bytes_total > 64 * 2**30
