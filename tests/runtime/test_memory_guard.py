"""The memory guard refuses a plan that cannot fit before any weight is read, naming bytes per device."""
from __future__ import annotations

import shutil

import pytest
import torch

from planner.cli import main
from runtime.errors import HardwareError
from runtime.loader import inspect_model
from runtime.memory_guard import check_fits, memory_plan

PLAN = """version: 1
model: {{name: t, path: {path}, dtype: float32}}
hardware: {{accelerator: cpu, cpu_threads: 1}}
cache: {{slots: 2, policy: lru, preload: none}}
"""


def test_experts_beyond_host_memory_are_refused_with_bytes_per_device(checkpoint):
    folder, _ = checkpoint("mixtral")
    shape = inspect_model(folder, "float32")
    experts = shape.expert_bytes_total
    needs = memory_plan(shape, [2] * shape.num_moe_layers, torch.device("cpu"), 64,
                        host_available=lambda: experts // 2)  # half the routed experts' bytes free
    assert needs[0].needed >= experts and needs[0].available == experts // 2
    with pytest.raises(HardwareError) as exc:
        check_fits(needs)
    message = str(exc.value)
    assert "the plan does not fit: host: needs" in message
    assert f"{needs[0].needed / 1e9:.2f} GB" in message and f"{experts / 2 / 1e9:.2f} GB available" in message
    assert f"experts {experts / 1e9:.2f}" in message


def test_a_plan_that_fits_passes_and_unknown_memory_is_not_checked(checkpoint):
    folder, _ = checkpoint("mixtral")
    shape = inspect_model(folder, "float32")
    check_fits(memory_plan(shape, [0] * shape.num_moe_layers, torch.device("cpu"), 64,
                           host_available=lambda: 10**12))
    check_fits(memory_plan(shape, [8] * shape.num_moe_layers, torch.device("cpu"), 10**9,
                           host_available=lambda: None))  # /proc/meminfo unreadable: no refusal


def test_run_refuses_before_reading_any_weight(checkpoint, tmp_path, capsys):
    """A context whose KV cache cannot fit in this host's memory: refused, and the weights are never read.

    The copy's safetensors file is truncated: had `run` opened it, the error would say corrupt safetensors.
    """
    folder, _ = checkpoint("mixtral")
    broken = tmp_path / "ckpt"
    shutil.copytree(folder, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.format(path=broken))
    capsys.readouterr()
    code = main(["run", str(plan), "--max-new-tokens", "1000000000"])
    out, err = capsys.readouterr()
    assert code == 1
    assert "the plan does not fit: host: needs" in err and "GB available" in err and "kv_cache" in err
    assert "Loading weights" not in err and "loaded " not in err and "corrupt" not in err
    assert out == ""


def test_page_locking_that_would_leave_the_host_too_little_is_refused_with_numbers(checkpoint):
    """An accelerator plan page-locks every routed expert in place; the guard refuses one that would leave
    the host less than the unlocked margin, naming the bytes (a CPU plan locks nothing)."""
    from runtime.contracts.memory import HOST_LOCK_MARGIN
    from runtime.memory_guard import lock_plan

    folder, _ = checkpoint("mixtral")
    shape = inspect_model(folder, "float32")
    experts = shape.expert_bytes_total
    assert lock_plan(shape, on_accelerator=False) is None
    short = lock_plan(shape, True, host_total=lambda: experts + HOST_LOCK_MARGIN - 1)
    assert short.needed == experts + HOST_LOCK_MARGIN and short.items["experts_locked"] == experts
    with pytest.raises(HardwareError) as exc:
        check_fits([short])
    message = str(exc.value)
    assert "host page-locked: needs" in message and f"experts_locked {experts / 1e9:.2f}" in message
    assert f"unlocked_margin {HOST_LOCK_MARGIN / 1e9:.2f}" in message and "of host memory in all" in message
    check_fits([lock_plan(shape, True, host_total=lambda: experts + HOST_LOCK_MARGIN)])
