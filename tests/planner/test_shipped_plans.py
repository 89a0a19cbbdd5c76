"""The shipped GPU plans fit the cards they were tuned for, with the accelerator reserve kept free."""
from __future__ import annotations

import json

import pytest

from planner.cli import main
from planner.paths import PLANS, PROFILES
from runtime.contracts.memory import ACCELERATOR_RESERVE


@pytest.mark.parametrize("name", ["rtx4070", "rtx4090", "rtx3060-12gb"])
def test_shipped_gpu_plan_fits_with_the_reserve(name, capsys):
    assert main(["explain", str(PLANS / f"{name}.yaml"), "--profile", str(PROFILES / f"{name}.yaml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"], out["notes"]
    accelerator = out["memory_items"]["accelerator"]
    assert accelerator["reserve"] >= ACCELERATOR_RESERVE and accelerator["transfer_scratch"] > 0
    assert out["memory_bytes"]["accelerator"] <= out["memory_limit_bytes"]["accelerator"]
