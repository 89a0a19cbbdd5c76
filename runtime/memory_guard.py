"""Refuse a plan that cannot fit, before any weight is read, and say the memory plan per device.

Needed on the accelerator: dense weights + KV cache for the context + cache slots + workspace.
Needed in host memory: every routed expert (they all live there), plus the dense weights while loading
(or for good, with `accelerator: cpu`, where the cache slots are host memory too).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import HardwareError
from .loader import ModelLayout

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
        return f"{self.device}: needs {self.needed / GB:.2f} GB ({parts}); {have}"


def host_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_plan(layout: ModelLayout, slots: list[int], device: torch.device, context_tokens: int,
                workspace_bytes: int,
                host_available: Callable[[], int | None] = host_available_bytes) -> list[DeviceNeed]:
    """What each device needs for this plan; `host_available` says the free host bytes (tests pass a figure)."""
    experts_total = layout.expert_bytes * layout.num_experts * layout.moe_layers
    slot_bytes = layout.expert_bytes * sum(slots)
    kv = layout.kv_bytes_per_token * context_tokens
    if device.type == "cpu":
        items = {"dense": layout.dense_bytes, "experts": experts_total, "cache slots": slot_bytes, "KV cache": kv,
                 "workspace": workspace_bytes}
        return [DeviceNeed("host", sum(items.values()), host_available(), items)]
    free, _total = torch.cuda.mem_get_info(device)
    acc_items = {"dense": layout.dense_bytes, "KV cache": kv, "cache slots": slot_bytes, "workspace": workspace_bytes}
    host_items = {"experts": experts_total, "dense while loading": layout.dense_bytes}
    return [DeviceNeed(str(device), sum(acc_items.values()), free, acc_items),
            DeviceNeed("host", sum(host_items.values()), host_available(), host_items)]


def check_fits(needs: list[DeviceNeed]) -> None:
    for need in needs:
        log.info("memory plan: %s", need.describe())
    short = [n for n in needs if n.available is not None and n.needed > n.available]
    if short:
        raise HardwareError("the plan does not fit: " + "; ".join(n.describe() for n in short))
