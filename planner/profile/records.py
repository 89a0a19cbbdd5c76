"""The parts of a hardware profile (schema version 1) and the arithmetic that reads them: pure data.

The rows of the measured tables, the host, CPU and accelerator sections, and interpolation. `Profile`
(profile.py) assembles them; the schema (schema.py) reads and writes them. Pure Python (no torch).

Units: seconds, bytes, GB/s = 1e9 bytes per second, GFLOP/s = 1e9 and TFLOP/s = 1e12 floating-point
operations per second, counting a multiply-add as 2.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from runtime.contracts import expert_format
from runtime.errors import UserError

SCHEMA_VERSION = 1
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
# What an expert timing's weights were stored as (the `dtype` of expert_ffn and moe_layer rows, the keys
# of cpu.expert_gbps / expert_gflops): a float dtype or an integer expert format (int8, int4).
EXPERT_FORMATS: tuple[str, ...] = expert_format.FORMATS
SOURCES = ("measured", "published")
# Where a timing's weights were: `cold` (read from DRAM: a model larger than the last-level cache) or
# `warm` (in the last-level cache: a model whose bytes per decode token fit it).
CACHE_STATES = ("warm", "cold")
# The runtime's CPU paths for a MoE layer's experts (runtime/cpu_executor.py, runtime/moe_layer.py):
#   token: `CpuExecutor.token`, one token through all its experts in one fused kernel call (decode of a
#          CPU plan, misses and host-memory slots alike);
#   run:   `CpuExecutor.run`, the CPU misses of one pass, several tokens each (prefill; decode with a GPU);
#   torch: one expert through `expert_math.module_expert_ffn` (torch's matmul), as a CPU plan computes an
#          expert from its slot in a pass that also copies a miss into the cache.
MOE_PATHS = ("token", "run", "torch")


class ProfileError(UserError):
    """A hardware profile that is missing, malformed, out of range, or lacks a figure that was asked for."""


# ---- rows of the measured tables ---------------------------------------------------------------
@dataclass(frozen=True)
class ExpertRow:
    """One timing of a gated expert FFN (3 matrices H x I) on `tokens` tokens."""
    hidden: int
    intermediate: int
    dtype: str
    tokens: int
    median_s: float
    spread: float  # (p90 - p10) / median of the repeats: 0.05 = the repeats spread over 5 %
    threads: int | None = None  # CPU threads (CPU rows); None on accelerator rows


@dataclass(frozen=True)
class DenseRow:
    """One timing of a decoder layer without its experts (norms, attention with KV cache, router).

    `tokens` new tokens attend to `context` positions in all (context includes the new tokens):
    tokens 1 is a decode step, tokens == context a prefill.
    """
    hidden: int
    heads: int
    kv_heads: int
    dtype: str
    tokens: int
    context: int
    median_s: float
    spread: float
    threads: int | None = None  # CPU threads (CPU rows); None on accelerator rows
    head_dim: int | None = None  # None: hidden // heads
    cache: str | None = None  # warm | cold; None: cold (caches flushed before each repeat)


@dataclass(frozen=True)
class MoeRow:
    """One call of the runtime's CPU path on one MoE layer's experts: `experts` experts (H x I, gated),
    `tokens` tokens each, through `path` (MOE_PATHS), with the weights `cache` (CACHE_STATES)."""
    hidden: int
    intermediate: int
    dtype: str
    threads: int
    path: str
    experts: int
    tokens: int
    cache: str
    median_s: float
    spread: float


@dataclass(frozen=True)
class StepRow:
    """The part of one decode step outside the decoder layers: the runtime's generation loop with token
    embedding, rotary tables, final norm, the lm_head on the last token (`vocab` x `hidden`) and picking the
    token, as the runtime runs them."""
    hidden: int
    vocab: int
    dtype: str
    threads: int
    cache: str
    median_s: float
    spread: float


@dataclass(frozen=True)
class LoopLayerRow:
    """One decoder layer timed inside the runtime's own decode loop (a CPU plan without slots): its dense part
    and its `experts` experts of one token along the fused path, among the rest of a decode step, at a mean
    KV length of `context`. Against the same layer's parts timed alone (`dense_layer`, `moe_layer` token
    rows of the same run), it says what a layer costs in a run beyond them."""
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    dtype: str
    threads: int
    experts: int
    context: int
    cache: str
    median_s: float
    spread: float
    head_dim: int | None = None  # None: hidden // heads


@dataclass(frozen=True)
class TransferRow:
    """One timing of a copy between host and accelerator memory."""
    direction: str  # h2d | d2h
    pinned: bool  # host side in page-locked memory
    bytes: int
    median_s: float
    spread: float


# ---- sections ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostInfo:
    physical_cores: int
    memory_bytes: int
    cpu_model: str | None = None
    logical_cores: int | None = None
    isa: tuple[str, ...] = ()  # vector/matrix extensions the CPU reports (avx2, avx512f, amx_bf16, ...)
    available_memory_bytes: int | None = None  # free for use when the profile was measured
    llc_bytes: int | None = None  # last-level cache (the largest CPU cache the OS reports)
    os: str | None = None
    torch: str | None = None


@dataclass(frozen=True)
class PolicyRow:
    """One cache policy's bookkeeping per MoE layer and pass (`route_pass`, promotion on) for a layer of
    `experts` routed experts, `top_k` chosen per token and `slots` cached, on a seeded random routing."""
    policy: str
    experts: int
    top_k: int
    slots: int
    median_s: float
    spread: float


@dataclass(frozen=True)
class CpuProfile:
    memory_read_gbps: dict[int, float]  # thread count -> DRAM read rate
    # dtype -> thread count -> rate of the expert kernel: bandwidth-bound (1 token), compute-bound (many)
    expert_gbps: dict[str, dict[int, float]] | None = None
    expert_gflops: dict[str, dict[int, float]] | None = None
    expert_overhead_s: float | None = None  # fixed cost of one expert call
    layer_overhead_s: float | None = None  # dense part of one decoder layer per pass, beyond its bytes
    expert_ffn: tuple[ExpertRow, ...] = ()
    dense_layer: tuple[DenseRow, ...] = ()
    memory_copy_gbps: dict[int, float] | None = None  # thread count -> host copy rate (bytes copied / s)
    moe_layer: tuple[MoeRow, ...] = ()
    model_step: tuple[StepRow, ...] = ()
    decode_layer: tuple[LoopLayerRow, ...] = ()
    policy_step: tuple[PolicyRow, ...] = ()


@dataclass(frozen=True)
class AcceleratorProfile:
    name: str
    memory_bytes: int
    h2d_pinned_gbps: float  # large-transfer host-to-device rate from page-locked memory
    # usable: free on the card once the CUDA context and cuBLAS are made (what `run` finds free), measured
    free_memory_bytes: int | None = None
    driver: str | None = None
    pcie_gen: int | None = None
    pcie_width: int | None = None
    h2d_pageable_gbps: float | None = None
    d2h_pinned_gbps: float | None = None
    d2h_pageable_gbps: float | None = None
    transfers: tuple[TransferRow, ...] = ()
    memory_bandwidth_gbps: float | None = None  # device memory: dense and hit-expert time at decode
    matmul_tflops: dict[str, float] | None = None  # dtype -> large-matmul rate
    kernel_overhead_s: float | None = None  # per expert call
    layer_overhead_s: float | None = None  # dense part of one decoder layer per pass, beyond bytes
    expert_ffn: tuple[ExpertRow, ...] = ()
    dense_layer: tuple[DenseRow, ...] = ()
    # round trip of one small blocking host sync (a few KB copied device-to-host into pinned memory, an
    # event recorded and waited for): what each MoE layer of a CUDA plan pays once per pass
    host_sync_s: float | None = None
    # large host-to-device copies from memory page-locked in place (cudaHostRegister), as the runtime's
    # expert memory is, rather than allocated pinned
    h2d_registered_gbps: float | None = None


# ---- shared arithmetic -------------------------------------------------------------------------
def expert_bytes(hidden: int, intermediate: int, dtype: str) -> int:
    """Weight bytes of one gated expert: gate and up ([2I, H]) plus down ([H, I]), stored as `dtype` (a float
    dtype, or int8/int4 with float16 scales per group of the default size: runtime/contracts/expert_format.py)."""
    return expert_format.expert_bytes(dtype, hidden, intermediate)


def expert_flops(hidden: int, intermediate: int, tokens: int) -> float:
    """Floating-point operations of one gated expert on `tokens` tokens (a multiply-add counts 2)."""
    return 2.0 * 3 * hidden * intermediate * tokens


def check_call(hidden: int, intermediate: int, dtype: str, tokens: int) -> None:
    if dtype not in EXPERT_FORMATS:
        raise ValueError(f"dtype must be one of {', '.join(EXPERT_FORMATS)}, got {dtype!r}")
    for name, value, lo in (("hidden", hidden, 1), ("intermediate", intermediate, 1), ("tokens", tokens, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def check_threads(threads: int) -> None:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")


def interpolate(points: Mapping[int, float], x: float) -> float:
    """Piecewise-linear through `points` (key -> value), clamped to the end values outside them."""
    keys = sorted(points)
    if x <= keys[0]:
        return float(points[keys[0]])
    if x >= keys[-1]:
        return float(points[keys[-1]])
    i = bisect.bisect_right(keys, x)
    x0, x1 = keys[i - 1], keys[i]
    y0, y1 = points[x0], points[x1]
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def interpolate_tokens(rows: Iterable[ExpertRow], tokens: int) -> float | None:
    """Time at `tokens` from rows of one shape, dtype and thread count, or None when the rows cannot say.

    Piecewise-linear between measured token counts (clamped below the smallest); beyond the largest
    one, time keeps growing at the slope of the last segment (a compute-bound kernel is linear in
    tokens), never below the last time. A single measured count gives no slope: None, and the caller
    uses the fitted rates.
    """
    points: dict[int, float] = {}
    for r in rows:
        points[r.tokens] = r.median_s
    keys = sorted(points)
    if tokens <= keys[-1]:
        return interpolate(points, tokens)
    if len(keys) == 1:
        return None
    x0, x1 = keys[-2], keys[-1]
    slope = max(0.0, (points[x1] - points[x0]) / (x1 - x0))
    return points[x1] + slope * (tokens - x1)


def interpolate_count(points: Mapping[int, float], n: float) -> float:
    """Time of a call on `n` experts from times measured at some counts (count -> seconds).

    No experts, no call: below the smallest count measured the time falls in proportion towards 0.
    Between counts, piecewise-linear; beyond the largest, the last segment's slope continues (a fixed
    cost per call plus a cost per expert), never below the last time; one count alone scales in proportion.
    """
    keys = sorted(points)
    if n <= 0:
        return 0.0
    if n <= keys[0]:
        return float(points[keys[0]]) * n / keys[0]
    if n <= keys[-1]:
        return interpolate(points, n)
    if len(keys) == 1:
        return float(points[keys[0]]) * n / keys[0]
    x0, x1 = keys[-2], keys[-1]
    slope = max(0.0, (points[x1] - points[x0]) / (x1 - x0))
    return float(points[x1] + slope * (n - x1))
