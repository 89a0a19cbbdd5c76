"""The hardware profile (schema version 1): measured or published speeds of one host, as the planner reads them.

A profile is data: frozen dataclasses loaded strictly from YAML (`Profile.load`), written atomically
(`profile.save`), round-tripping (`Profile.from_yaml(p.to_yaml()) == p`). Everyone else reads it
through the methods below (`memory_read_gbps`, `cpu_expert_seconds`, `accelerator_expert_seconds`,
`h2d_seconds`, ...), never by hand, so that interpolation and the fallback to fitted rates live in one
place. Pure Python (no torch): the cost model and the tuner import it.

Units: seconds, bytes, GB/s = 1e9 bytes per second, GFLOP/s = 1e9 and TFLOP/s = 1e12 floating-point
operations per second, counting a multiply-add as 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.atomic import write_atomic
from runtime.textfile import parse_yaml, read_text

from .records import (CACHE_STATES, MOE_PATHS, SCHEMA_VERSION, AcceleratorProfile, CpuProfile, ExpertRow, HostInfo,
                      MoeRow, ProfileError, check_call, check_threads, expert_bytes, expert_flops, interpolate,
                      interpolate_count, interpolate_tokens)
from .schema import dump_yaml, parse_profile, profile_to_dict


@dataclass(frozen=True)
class Profile:
    name: str
    source: str  # measured | published
    host: HostInfo
    cpu: CpuProfile
    accelerator: AcceleratorProfile | None = None
    date: str | None = None  # ISO 8601, UTC
    version: int = SCHEMA_VERSION

    # The tables are dicts (readable, interpolated by key); hash the canonical text instead.
    def __hash__(self) -> int:
        return hash(self.to_yaml())

    # ---- what the rest of moeplan reads ---------------------------------------------------------
    @property
    def physical_cores(self) -> int:
        return self.host.physical_cores

    @property
    def host_memory_bytes(self) -> int:
        return self.host.memory_bytes

    @property
    def has_accelerator(self) -> bool:
        return self.accelerator is not None

    @property
    def accelerator_memory_bytes(self) -> int:
        """Total accelerator memory; 0 when the profile has no accelerator."""
        return self.accelerator.memory_bytes if self.accelerator is not None else 0

    @property
    def llc_bytes(self) -> int | None:
        """The last-level cache the profile recorded, or None (a profile without `host.llc_bytes`)."""
        return self.host.llc_bytes

    def memory_read_gbps(self, threads: int) -> float:
        """DRAM read rate with `threads` threads, interpolated between measured counts, clamped at the ends."""
        check_threads(threads)
        return interpolate(self.cpu.memory_read_gbps, threads)

    def cpu_expert_seconds(self, hidden: int, intermediate: int, dtype: str, tokens: int, threads: int) -> float:
        """Time of one gated expert FFN (3 matrices `hidden` x `intermediate`) on `tokens` tokens on the CPU.

        From the measured table when this shape and dtype were measured (interpolated over tokens and
        threads), else `overhead + max(weight_bytes / expert_gbps, flops / expert_gflops)`.
        """
        check_call(hidden, intermediate, dtype, tokens)
        check_threads(threads)
        if tokens == 0:
            return 0.0
        rows = [r for r in self.cpu.expert_ffn
                if (r.hidden, r.intermediate, r.dtype) == (hidden, intermediate, dtype) and r.threads is not None]
        if rows:
            by_threads: dict[int, list[ExpertRow]] = {}
            for r in rows:
                by_threads.setdefault(r.threads, []).append(r)  # type: ignore[arg-type]
            per_thread = {n: interpolate_tokens(rs, tokens) for n, rs in by_threads.items()}
            if all(t is not None for t in per_thread.values()):
                return interpolate(per_thread, threads)  # type: ignore[arg-type]
        gbps = self._cpu_rate("expert_gbps", self.cpu.expert_gbps, dtype, threads)
        gflops = self._cpu_rate("expert_gflops", self.cpu.expert_gflops, dtype, threads)
        overhead = self._need(self.cpu.expert_overhead_s, "cpu.expert_overhead_s")
        return overhead + max(expert_bytes(hidden, intermediate, dtype) / (gbps * 1e9),
                              expert_flops(hidden, intermediate, tokens) / (gflops * 1e9))

    def cpu_moe_seconds(self, hidden: int, intermediate: int, dtype: str, path: str, experts: float, tokens: int,
                        threads: int, cache: str) -> float | None:
        """Time of one call of the runtime's CPU `path` (records.MOE_PATHS) on `experts` experts of
        `tokens` tokens each, weights `cache` (warm | cold), from the measured `cpu.moe_layer` rows; None
        when the profile has no rows for this shape, dtype, path and cache state (or cannot say for
        these tokens). Interpolated over tokens (as `cpu_expert_seconds`), over the expert count
        (`interpolate_count`: fractional counts are the mean of a replay) and over threads."""
        check_call(hidden, intermediate, dtype, tokens)
        check_threads(threads)
        if path not in MOE_PATHS or cache not in CACHE_STATES:
            raise ValueError(f"path must be one of {', '.join(MOE_PATHS)} and cache one of "
                             f"{', '.join(CACHE_STATES)}, got {path!r}, {cache!r}")
        if tokens == 0 or experts <= 0:
            return 0.0
        rows = [r for r in self.cpu.moe_layer
                if (r.hidden, r.intermediate, r.dtype, r.path, r.cache) == (hidden, intermediate, dtype, path, cache)]
        if not rows:
            return None
        grouped: dict[int, dict[int, list[MoeRow]]] = {}
        for r in rows:
            grouped.setdefault(r.threads, {}).setdefault(r.experts, []).append(r)
        per_thread: dict[int, float] = {}
        for n, by_count in grouped.items():
            points = {count: interpolate_tokens(rs, tokens) for count, rs in by_count.items()}
            if any(t is None for t in points.values()):
                return None
            per_thread[n] = interpolate_count(points, experts)  # type: ignore[arg-type]
        return interpolate(per_thread, threads)

    def cpu_step_seconds(self, hidden: int, vocab: int, dtype: str, threads: int, cache: str) -> float | None:
        """Time of a decode step outside the decoder layers (embedding, final norm, lm_head, token pick)
        from the measured `cpu.model_step` rows of this hidden size, vocabulary and dtype (interpolated
        over threads), or None when the profile has none for this cache state."""
        check_threads(threads)
        rows = [r for r in self.cpu.model_step
                if (r.hidden, r.vocab, r.dtype, r.cache) == (hidden, vocab, dtype, cache)]
        if not rows:
            return None
        return interpolate({r.threads: r.median_s for r in rows}, threads)

    def host_copy_seconds(self, nbytes: int, threads: int) -> float | None:
        """Time to copy `nbytes` within host memory (a CPU plan's promotion into a slot) at the measured
        `cpu.memory_copy_gbps`, or None when the profile has no copy rate."""
        check_threads(threads)
        if self.cpu.memory_copy_gbps is None:
            return None
        return nbytes / (interpolate(self.cpu.memory_copy_gbps, threads) * 1e9)

    def accelerator_expert_seconds(self, hidden: int, intermediate: int, dtype: str, tokens: int) -> float:
        """Time of one gated expert FFN on the accelerator, weights already resident there.

        From the measured table when this shape and dtype were measured, else
        `kernel_overhead + max(weight_bytes / memory_bandwidth, flops / matmul_tflops)`.
        """
        check_call(hidden, intermediate, dtype, tokens)
        acc = self._accelerator("accelerator_expert_seconds")
        if tokens == 0:
            return 0.0
        rows = [r for r in acc.expert_ffn if (r.hidden, r.intermediate, r.dtype) == (hidden, intermediate, dtype)]
        measured = interpolate_tokens(rows, tokens) if rows else None
        if measured is not None:
            return measured
        bandwidth = self._need(acc.memory_bandwidth_gbps, "accelerator.memory_bandwidth_gbps")
        tflops = self._need((acc.matmul_tflops or {}).get(dtype), f"accelerator.matmul_tflops.{dtype}")
        overhead = self._need(acc.kernel_overhead_s, "accelerator.kernel_overhead_s")
        return overhead + max(expert_bytes(hidden, intermediate, dtype) / (bandwidth * 1e9),
                              expert_flops(hidden, intermediate, tokens) / (tflops * 1e12))

    def h2d_seconds(self, nbytes: int, pinned: bool = True) -> float:
        """Time to copy `nbytes` from host to accelerator memory."""
        acc = self._accelerator("h2d_seconds")
        rate = acc.h2d_pinned_gbps if pinned else acc.h2d_pageable_gbps
        return self._transfer_seconds(acc, "h2d", nbytes, pinned, rate,
                                      "accelerator.h2d_pinned_gbps" if pinned else "accelerator.h2d_pageable_gbps")

    def d2h_seconds(self, nbytes: int, pinned: bool = True) -> float:
        """Time to copy `nbytes` from accelerator to host memory."""
        acc = self._accelerator("d2h_seconds")
        rate = acc.d2h_pinned_gbps if pinned else acc.d2h_pageable_gbps
        return self._transfer_seconds(acc, "d2h", nbytes, pinned, rate,
                                      "accelerator.d2h_pinned_gbps" if pinned else "accelerator.d2h_pageable_gbps")

    # ---- loading and saving ---------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> "Profile":
        try:
            return cls(**parse_profile(data))
        except ProfileError as exc:
            raise ProfileError(f"{source}: {exc}") from None

    @classmethod
    def from_yaml(cls, text: str, source: str = "profile") -> "Profile":
        return cls.from_dict(parse_yaml(text, source, ProfileError), source)

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        return cls.from_yaml(read_text(path, ProfileError, "profile file"), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return profile_to_dict(self)

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    def save(self, path: str | Path) -> Path:
        """Write the profile to `path` atomically (a reader never sees half a file)."""
        return write_atomic(path, self.to_yaml())

    # ---- helpers ------------------------------------------------------------------------------
    def _accelerator(self, what: str) -> AcceleratorProfile:
        if self.accelerator is None:
            raise ProfileError(f"profile {self.name}: accelerator: is null (no GPU was measured), "
                               f"so {what} has nothing to answer from")
        return self.accelerator

    def _need(self, value: float | None, field_path: str) -> float:
        if value is None:
            raise ProfileError(f"profile {self.name}: {field_path}: missing, and the planner needs it")
        return value

    def _cpu_rate(self, field_name: str, table: dict[str, dict[int, float]] | None, dtype: str,
                  threads: int) -> float:
        if not table or dtype not in table:
            have = ", ".join(sorted(table or {})) or "none"
            raise ProfileError(f"profile {self.name}: cpu.{field_name}.{dtype}: missing (the profile has: {have}), "
                               f"and this expert shape is not in cpu.expert_ffn")
        return interpolate(table[dtype], threads)

    def _transfer_seconds(self, acc: AcceleratorProfile, direction: str, nbytes: int, pinned: bool,
                          rate_gbps: float | None, rate_field: str) -> float:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"nbytes must be an integer >= 0, got {nbytes!r}")
        if nbytes == 0:
            return 0.0
        rows = sorted((r for r in acc.transfers if r.direction == direction and r.pinned == pinned),
                      key=lambda r: r.bytes)
        if not rows:
            return nbytes / (self._need(rate_gbps, rate_field) * 1e9)
        if nbytes <= rows[0].bytes:
            return rows[0].median_s  # below the smallest size measured, latency dominates: no scaling down
        if nbytes >= rows[-1].bytes:
            # Beyond the largest size, the copy streams at the large-transfer rate.
            tail_rate = rate_gbps * 1e9 if rate_gbps else rows[-1].bytes / rows[-1].median_s
            return rows[-1].median_s + (nbytes - rows[-1].bytes) / tail_rate
        return interpolate({r.bytes: r.median_s for r in rows}, nbytes)
