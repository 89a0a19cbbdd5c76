"""Refuse a plan that cannot fit, before any weight is read, and say the memory plan per device.

What each device needs is `runtime.contracts.memory.memory_items`, the accounting the planner's cost
model uses too; this module compares it with what this host has free now.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .contracts.cache_policy import MissRule
from .contracts.memory import ACCELERATOR, HOST, HOST_LOCK_MARGIN, locked_host_bytes, memory_items
from .contracts.model_shape import ModelShape
from .errors import HardwareError

log = logging.getLogger(__name__)
GB = 1e9


@dataclass(frozen=True)
class DeviceNeed:
    device: str
    needed: int
    available: int | None  # None: unknown on this platform (then not checked)
    items: dict[str, int]

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in self.items.items() if v)
        have = "unknown" if self.available is None else f"{self.available / GB:.2f} GB available"
        if self.device == "host page-locked" and self.available is not None:
            have = f"{self.available / GB:.2f} GB of host memory in all"
        return f"{self.device}: needs {self.needed / GB:.2f} GB ({parts}); {have}"


def _meminfo_bytes(field: str) -> int | None:
    """A /proc/meminfo field in bytes (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    return _meminfo_bytes("MemAvailable")


def host_total_bytes() -> int | None:
    """MemTotal from /proc/meminfo (Linux); None where it cannot be read."""
    return _meminfo_bytes("MemTotal")


def lock_plan(shape: ModelShape, on_accelerator: bool,
              host_total: Callable[[], int | None] = host_total_bytes) -> DeviceNeed | None:
    """What an accelerator plan page-locks, with the margin it must leave, against the host's total memory
    (locked pages are taken from all of it, for as long as the run lasts); None with `accelerator: cpu`."""
    locked = locked_host_bytes(shape, on_accelerator)
    if not locked:
        return None
    return DeviceNeed("host page-locked", locked + HOST_LOCK_MARGIN, host_total(),
                      {"experts_locked": locked, "unlocked_margin": HOST_LOCK_MARGIN})


def memory_plan(shape: ModelShape, slots: list[int], device: torch.device, context_tokens: int,
                host_available: Callable[[], int | None] = host_available_bytes,
                host_total: Callable[[], int | None] = host_total_bytes,
                rule: MissRule = MissRule()) -> list[DeviceNeed]:
    """What each device needs for this plan; `host_available` says the free host bytes (tests pass a figure).

    `context_tokens` (prompt and new tokens) bounds both the KV cache and the tokens of one pass;
    `rule`: the plan's miss rule (where misses are computed: the transfer buffers, the CPU experts' pass)."""
    items = memory_items(shape, sum(slots), device.type != "cpu", kv_tokens=context_tokens,
                         pass_tokens=context_tokens, rule=rule)
    needs = []
    if ACCELERATOR in items:
        free, _total = torch.cuda.mem_get_info(device)
        needs.append(DeviceNeed(str(device), sum(items[ACCELERATOR].values()), free, items[ACCELERATOR]))
    needs.append(DeviceNeed("host", sum(items[HOST].values()), host_available(), items[HOST]))
    locking = lock_plan(shape, device.type != "cpu", host_total)
    if locking is not None:
        needs.append(locking)
    return needs


def check_fits(needs: list[DeviceNeed]) -> None:
    for need in needs:
        log.info("memory plan: %s", need.describe())
    short = [n for n in needs if n.available is not None and n.needed > n.available]
    if short:
        raise HardwareError("the plan does not fit: " + "; ".join(n.describe() for n in short))
