"""Predicted speed and memory of a plan: a pure function of (profile, model shape, workload, plan, replay).

Pure Python over numbers (no torch), so that the tuner can call it thousands of times. Every rate comes
from the profile, every size from the model shape, every count of hits, misses and copies from the cache
simulator's replay of a routing trace; this module only adds them up along the critical path
(docs/explain.md says item by item how).

The critical path of one forward pass, per decoder layer:
- the dense part (attention, norms, router, shared expert or dense MLP) reads its weights and the KV
  cache once: bytes / memory bandwidth + the profile's fixed per-layer overhead;
- then the MoE part: experts that hit are computed from their slots on the accelerator while the CPU
  threads compute the CPU misses one after another; experts copied to be computed on the accelerator
  (transfers) wait for their copy; on a CUDA plan the copy of the next transfer runs while this one is
  computed (double-buffered, `pipelined_transfers_s`). Where the runtime's schedule overlaps the two sides
  (`runtime.contracts.schedule.CPU_OVERLAPS_ACCELERATOR`, true since the CUDA execution order of
  DESIGN.md), the layer costs max(accelerator side, CPU side); where it did not, they added up. With
  `accelerator: cpu` everything runs on the CPU, one after another, and a "copy" is a host memory copy.
- on a CUDA plan each MoE layer blocks the host `HOST_SYNCS_PER_MOE_LAYER` times a pass (the runtime's
  figure), each the profile's `accelerator.host_sync_s` round trip (`host_sync_s` in the breakdown);
- background copies (promotion after a CPU miss, prefetch) use the PCIe link while the rest runs; only
  the part that exceeds the pass's time lands on the critical path. They read host DRAM, though, while
  the CPU threads stream the CPU misses from it (`COPIES_SHARE_DRAM_WITH_CPU_MISSES`): the bytes copied
  during a layer's CPU work (at most its CPU time times the copy rate) cost that work their time at the
  DRAM read rate (`copy_contention_s`, on the CPU side of the layer). On the CPU they are memory copies
  done by the same threads, so they count in full.
- each MoE layer whose cache can change (slots, or misses sent to the accelerator) runs the policy's
  bookkeeping (`route_pass`) on the host CPU once a pass, between the router and the experts: the
  profile's `cpu.policy_step` rows for the plan's policy at the model's width (`policy_s`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.contracts.expert_format import is_quantized
from runtime.contracts.memory import memory_items
from runtime.contracts.model_shape import ModelShape
from runtime.contracts.schedule import (COPIES_SHARE_DRAM_WITH_CPU_MISSES, CPU_OVERLAPS_ACCELERATOR,
                                        HOST_SYNCS_PER_MOE_LAYER, TRANSFER_BUFFERS)
from runtime.plan import Plan

from .profile import ProfileError, interpolate


# ---- what the cost model reads from a cache replay -------------------------------------------------
@dataclass(frozen=True)
class LayerWork:
    """One MoE layer's expert work in one forward pass (decode: averaged over the decode passes).

    Each group maps a token count to how many experts ran with that many tokens (fractional when
    averaged): {1: 0.6} is 0.6 experts of one token per decode pass.
    """

    hits: Mapping[int, float]  # computed from a cache slot
    cpu_misses: Mapping[int, float]  # computed by CPU threads from host memory
    transfers: Mapping[int, float]  # copied to the accelerator, then computed there (on the critical path)
    background_copies: float  # promotion and prefetch copies (experts)


@dataclass(frozen=True)
class PassWork:
    """The expert work of one forward pass over all MoE layers (one entry per MoE layer)."""

    tokens: int
    layers: tuple[LayerWork, ...]


# ---- results --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Breakdown:
    """Seconds of one forward pass, item by item (decode: per token; prefill: per prompt)."""

    dense_s: float  # dense weights and KV cache read + per-layer framework overhead, all layers, lm_head
    hit_s: float  # experts computed from cache slots
    cpu_miss_s: float  # experts computed on CPU threads from host memory
    transfer_s: float  # copies on the critical path (transfers) and the compute that follows them
    background_copy_s: float  # promotion + prefetch copy time (runs beside the compute on a GPU)
    copy_excess_s: float  # part of the background copies that does not fit beside the compute
    overlap_s: float  # time saved by running the accelerator side and the CPU side at once (<= 0)
    total_s: float  # dense + hit + cpu_miss + transfer + copy_excess + overlap + host_sync + copy_contention + policy
    host_sync_s: float = 0.0  # blocking host syncs of the MoE layers (CUDA plans)
    copy_contention_s: float = 0.0  # CPU-miss time lost to background copies reading the same DRAM
    policy_s: float = 0.0  # the MoE layers' cache bookkeeping (`route_pass`) on the host CPU

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Prediction:
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    hit_rate: float  # hit rate of the replay over all its passes (what `run` reports)
    fits: bool
    memory_bytes: dict[str, int]  # device ("accelerator", "host") -> bytes the plan needs there
    memory_limit_bytes: dict[str, int]  # device -> bytes available
    decode: Breakdown  # seconds per decode token
    prefill: Breakdown  # seconds for the whole prompt
    memory_items: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> item -> bytes
    notes: tuple[str, ...] = ()  # why it does not fit, assumptions taken

    def as_dict(self) -> dict[str, Any]:
        return {
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "hit_rate": self.hit_rate,
            "fits": self.fits,
            "memory_bytes": dict(self.memory_bytes),
            "memory_limit_bytes": dict(self.memory_limit_bytes),
            "memory_items": {d: dict(items) for d, items in self.memory_items.items()},
            "decode_breakdown_s": self.decode.as_dict(),
            "prefill_breakdown_s": self.prefill.as_dict(),
            "notes": list(self.notes),
        }


# ---- the model -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpertTiming:
    """Which profile rows time the plan's experts, and how they are read.

    Float experts: the rows of the model's dtype. Integer experts (int8, int4): the profile's rows of that
    format where it timed this expert shape in it; where it did not, the rows of the model's dtype as they
    are. Not scaled by bytes: the int kernels multiply exactly the reference's dequantized weights, and on
    the AVX2 machine that is bound by arithmetic, not memory (one token's expert layer, benchmark shape: int4
    1.2x the bf16 kernel's speed on one thread and 1.6-1.7x on two for 3.6x fewer bytes, int8 1.1-1.2x for
    1.9x fewer: bench/results/cpu_kernel_int_avx2.md). The dtype's rows are then on the slow side for int
    experts; a profile measured with int rows (`moeplan profile` times them) replaces them. `note` says
    which rows, for `explain`.
    """

    cpu_key: str  # the `dtype` of the CPU rows used (cpu.expert_ffn, cpu.moe_layer, cpu.expert_gbps)
    one_token_scale: float  # multiplies a one-token CPU time read from those rows
    accelerator_key: str  # the `dtype` of the accelerator's expert_ffn rows used
    note: str | None

    def cpu_scale(self, tokens: int) -> float:
        return self.one_token_scale if tokens <= 1 else 1.0


def expert_timing(profile: Any, shape: ModelShape) -> ExpertTiming:
    """How the cost model times `shape`'s experts from `profile` (see `ExpertTiming`)."""
    fmt, dtype = shape.expert_format, shape.dtype
    if not is_quantized(fmt):
        return ExpertTiming(dtype, 1.0, dtype, None)  # the rows of the model's dtype, as for every float expert
    key = (shape.hidden, shape.expert_intermediate, fmt)
    cpu_rows = any((r.hidden, r.intermediate, r.dtype) == key for r in profile.cpu.expert_ffn)
    acc = profile.accelerator if profile.has_accelerator else None
    acc_rows = acc is not None and any((r.hidden, r.intermediate, r.dtype) == key for r in acc.expert_ffn)
    acc_key = fmt if acc_rows else dtype
    acc_note = "" if acc is None else (
        f"; accelerator expert times from its {fmt} rows" if acc_rows else
        f"; accelerator expert times from its {dtype} rows (each {fmt} expert is dequantized into a {dtype} "
        f"scratch, then multiplied)")
    if cpu_rows:
        return ExpertTiming(fmt, 1.0, acc_key, f"{fmt} experts: CPU expert times from the profile's {fmt} rows"
                            + acc_note)
    return ExpertTiming(dtype, 1.0, acc_key,
                        f"{fmt} experts: the profile has no {fmt} CPU rows for this expert shape, so CPU expert times "
                        f"are its {dtype} rows, not scaled by bytes (the exact int kernels are bound by arithmetic: "
                        f"on AVX2 they measured 1.1-1.7x the {dtype} kernel's speed for 1.9-3.6x fewer bytes, bench/results/"
                        f"cpu_kernel_int_avx2.md)" + acc_note)


@dataclass(frozen=True)
class _Rates:
    """The profile's rates for one plan: where the dense part and the hits run, and how fast copies go."""

    profile: Any
    shape: ModelShape
    on_gpu: bool
    threads: int
    cache: str = "cold"  # warm | cold: which CPU timings apply (`cache_state`: does a decode token fit the LLC)
    experts: ExpertTiming | None = None  # which rows time the experts (default: the model's dtype, unscaled)

    @property
    def timing(self) -> ExpertTiming:
        return self.experts or ExpertTiming(self.shape.dtype, 1.0, self.shape.dtype, None)

    def bandwidth_bps(self) -> float:
        """Device memory read rate: where the KV cache is read from."""
        if self.on_gpu:
            gbps = self.profile.accelerator.memory_bandwidth_gbps
            return _need(self.profile, gbps, "accelerator.memory_bandwidth_gbps") * 1e9
        return self.profile.memory_read_gbps(self.threads) * 1e9

    def weights_s(self, nbytes: float, tokens: int) -> float:
        """Time of dense matrices of `nbytes` on `tokens` tokens: read once at the memory rate for one
        token (the profile's model of the dense part), growing with tokens as this model's expert
        call grows on this device (both are matrix products; prefill turns them compute-bound)."""
        one = nbytes / self.bandwidth_bps()
        if tokens <= 1:
            return one
        return one * self.slot_expert_s(tokens) / self.slot_expert_s(1)

    def measured_layer_s(self, tokens: int, context: int, threads: int | None = None,
                         cache: str | None = None) -> float | None:
        """One decoder layer without experts (attention with KV cache, norms, router), from the profile's
        dense_layer table when it measured this model's attention shape and dtype; else None.

        Interpolated over the context (rows of the same tokens), then over threads (CPU rows), clamped
        at the ends; a prefill measured at another length is scaled by tokens. `threads` and `cache`: this
        plan's unless given.
        """
        s = self.shape
        threads = self.threads if threads is None else threads
        cache = self.cache if cache is None else cache
        if s.attention_params_override:  # MLA: the table's rows are plain attention
            return None
        side = self.profile.accelerator if self.on_gpu else self.profile.cpu
        rows = [r for r in side.dense_layer
                if (r.hidden, r.heads, r.kv_heads, r.dtype) == (s.hidden, s.num_heads, s.num_kv_heads, s.dtype)
                and (r.head_dim or r.hidden // r.heads) == s.head_dim]
        decode = tokens <= 1
        rows = [r for r in rows if (r.tokens == 1) == decode]
        # Rows timed in this plan's cache state; a profile without them (cold only, or rows that do not say,
        # which were timed cold) answers with what it has.
        rows = [r for r in rows if (r.cache or "cold") == cache] or rows
        if not rows:
            return None
        by_threads: dict[int, dict[int, float]] = {}
        for r in rows:
            x = r.context if decode else r.tokens
            by_threads.setdefault(r.threads or 0, {})[x] = r.median_s
        x = context if decode else tokens
        per_threads = {n: interpolate(points, x) for n, points in by_threads.items()}
        value = interpolate(per_threads, threads)
        if not decode:
            longest = max(max(points) for points in by_threads.values())
            value *= max(1.0, x / longest)  # beyond the measured prefill: linear in tokens
        return value

    def loop_extra_s(self) -> float:
        """What one decoder layer of a CPU plan's decode step takes in the runtime's decode loop beyond its
        parts timed alone: the profile's `cpu.decode_layer` row (the layer, dense part and top-k experts on
        the fused path, inside the runtime's generation loop) less the same run's `dense_layer` row at its
        context and `moe_layer` token row, per thread count (this plan's cache state, else what was timed).
        Negative where the loop runs the layer faster than its parts alone (the runtime's native decode step
        against the dense part timed through transformers' modules), but never below minus the dense part.
        0 on a GPU, without such rows, or where the parts were not timed."""
        s = self.shape
        if self.on_gpu:
            return 0.0
        rows = [r for r in self.profile.cpu.decode_layer
                if (r.hidden, r.intermediate, r.heads, r.kv_heads, r.dtype)
                == (s.hidden, s.expert_intermediate, s.num_heads, s.num_kv_heads, s.dtype)
                and (r.head_dim or r.hidden // r.heads) == s.head_dim]
        rows = [r for r in rows if r.cache == self.cache] or rows
        extra: dict[int, float] = {}
        for r in rows:
            dense = self.measured_layer_s(1, r.context, r.threads, r.cache)
            experts = self.profile.cpu_moe_seconds(s.hidden, s.expert_intermediate, s.dtype, "token", r.experts, 1,
                                                   r.threads, r.cache)
            if dense is not None and experts is not None:
                extra[r.threads] = max(-dense, r.median_s - dense - experts)
        return interpolate(extra, self.threads) if extra else 0.0

    def layer_overhead_s(self) -> float:
        value, where = ((self.profile.accelerator.layer_overhead_s, "accelerator.layer_overhead_s") if self.on_gpu
                        else (self.profile.cpu.layer_overhead_s, "cpu.layer_overhead_s"))
        return _need(self.profile, value, where)

    def slot_expert_s(self, tokens: int) -> float:
        s = self.shape
        if self.on_gpu:
            return self.profile.accelerator_expert_seconds(s.hidden, s.expert_intermediate, self.timing.accelerator_key,
                                                           tokens)
        return self.cpu_expert_s(tokens)

    def cpu_expert_s(self, tokens: int) -> float:
        s, t = self.shape, self.timing
        return self.profile.cpu_expert_seconds(s.hidden, s.expert_intermediate, t.cpu_key, tokens,
                                               self.threads) * t.cpu_scale(tokens)

    def copy_s(self) -> float:
        """One expert into a slot: PCIe from page-locked memory (the profile's rate from memory locked in
        place, as the runtime's is, where measured; else from pinned allocations), or a host memory copy at
        the profile's measured `cpu.memory_copy_gbps` (without it: read and write of every byte at the
        DRAM read rate)."""
        if self.on_gpu:
            registered = self.profile.accelerator.h2d_registered_gbps
            if registered is not None:
                return self.shape.expert_bytes / (registered * 1e9)
            return self.profile.h2d_seconds(self.shape.expert_bytes, pinned=True)
        measured = self.profile.host_copy_seconds(self.shape.expert_bytes, self.threads)
        if measured is not None:
            return measured
        return 2 * self.shape.expert_bytes / (self.profile.memory_read_gbps(self.threads) * 1e9)

    def host_sync_s(self) -> float:
        """One blocking host sync's round trip on the accelerator (0 where the profile has no figure: then
        `predict` says so in its notes)."""
        return (self.profile.accelerator.host_sync_s or 0.0) if self.on_gpu else 0.0

    def contention_s(self, copies: float, cpu_s: float) -> float:
        """CPU-miss time lost to `copies` background expert copies reading host DRAM during `cpu_s` of CPU
        work: the bytes copied meanwhile (at most `cpu_s` at the copy rate) at the DRAM read rate."""
        if not (self.on_gpu and COPIES_SHARE_DRAM_WITH_CPU_MISSES) or copies <= 0 or cpu_s <= 0:
            return 0.0
        nbytes = copies * self.shape.expert_bytes
        copy_bps = self.shape.expert_bytes / self.copy_s()
        return min(nbytes, cpu_s * copy_bps) / (self.profile.memory_read_gbps(self.threads) * 1e9)

    # ---- the runtime's CPU paths for a MoE layer's experts (the profile's `cpu.moe_layer` rows) -------
    @property
    def has_moe_rows(self) -> bool:
        """Whether the profile timed this model's experts through the runtime's MoE-layer paths."""
        s = self.shape
        return any((r.hidden, r.intermediate, r.dtype) == (s.hidden, s.expert_intermediate, self.timing.cpu_key)
                   for r in self.profile.cpu.moe_layer)

    def moe_s(self, path: str, experts: float, tokens: int) -> float | None:
        """One call of the runtime's CPU `path` (token | run | torch) on `experts` experts of `tokens` tokens
        each, in this plan's cache state (the cold rows where warm ones were not timed); None without rows."""
        s, t = self.shape, self.timing
        for cache in dict.fromkeys((self.cache, "cold")):
            value = self.profile.cpu_moe_seconds(s.hidden, s.expert_intermediate, t.cpu_key, path, experts, tokens,
                                                 self.threads, cache)
            if value is not None:
                return value * t.cpu_scale(tokens)
        return None

    def run_s(self, experts: float, tokens: int) -> float:
        """`CpuExecutor.run` on a pass's CPU misses; without a row, one expert after another."""
        value = self.moe_s("run", experts, tokens)
        return value if value is not None else experts * self.cpu_expert_s(tokens)

    def torch_s(self, tokens: int) -> float:
        """One expert computed from its slot by torch (a CPU plan's pass through `MoeLayer._pass`)."""
        value = self.moe_s("torch", 1, tokens)
        return value if value is not None else self.cpu_expert_s(tokens)

    def step_s(self) -> float | None:
        """The decode step outside the decoder layers (embedding, final norm, lm_head, token pick) from the
        profile's `cpu.model_step` rows (a CPU plan), in this plan's cache state or else cold; None without."""
        if self.on_gpu:
            return None
        s = self.shape
        for cache in dict.fromkeys((self.cache, "cold")):
            value = self.profile.cpu_step_seconds(s.hidden, s.vocab, s.dtype, self.threads, cache)
            if value is not None:
                return value
        return None


def decode_bytes(shape: ModelShape, context: int) -> int:
    """Bytes one decode token reads: every decoder layer's dense weights, the lm_head, the top-k experts of
    every MoE layer and the KV cache of `context` positions (the embedding contributes one row)."""
    return round(sum(shape.dense_params_per_layer) * shape.dtype_bytes + shape.vocab * shape.hidden * shape.dtype_bytes
                 + shape.num_moe_layers * shape.top_k * shape.expert_bytes + shape.kv_bytes_per_token * context)


def cache_state(profile: Any, shape: ModelShape, context: int) -> str:
    """`warm` when a decode token's bytes (`decode_bytes`) fit the profile's last-level cache, so that the
    weights stay there from one token to the next; else `cold` (and cold without `host.llc_bytes`)."""
    llc = profile.llc_bytes
    return "warm" if llc is not None and decode_bytes(shape, context) <= llc else "cold"


def _need(profile: Any, value: float | None, field_path: str) -> float:
    if value is None:
        raise ProfileError(f"profile {profile.name}: {field_path}: missing, and the cost model needs it")
    return value


def _group_s(group: Mapping[int, float], seconds_per_expert) -> float:
    return sum(count * seconds_per_expert(tokens) for tokens, count in group.items() if count)


def _pass_breakdown(rates: _Rates, work: PassWork, context: int, books: float = 0.0) -> Breakdown:
    """One pass's seconds; `books` is the pass's cache bookkeeping (`policy_books_s`)."""
    shape = rates.shape
    lm_head = shape.vocab * shape.hidden * shape.dtype_bytes
    measured = rates.measured_layer_s(work.tokens, context)
    if measured is not None:
        # The table covers attention, KV cache, norms and router; shared experts and dense MLPs are
        # the weights beyond those.
        attention = shape.attention_params + 2 * shape.norm_params + shape.qk_norm_params
        moe = set(shape.moe_layers)
        mlp = sum(n - attention - (shape.hidden * shape.num_experts if i in moe else 0)
                  for i, n in enumerate(shape.dense_params_per_layer))
        dense = shape.num_layers * measured + rates.weights_s(mlp * shape.dtype_bytes, work.tokens)
        if work.tokens == 1:  # a CPU decode step: each MoE layer's cost in the runtime's loop beyond its parts
            dense += shape.num_moe_layers * rates.loop_extra_s()
    else:
        kv_read = shape.kv_bytes_per_token * context  # every layer's KV cache, read once a pass
        layer_weights = sum(shape.dense_params_per_layer) * shape.dtype_bytes
        dense = (rates.weights_s(layer_weights, work.tokens) + kv_read / rates.bandwidth_bps()
                 + shape.num_layers * rates.layer_overhead_s())
    step = rates.step_s()
    # Outside the layers: the measured decode step (embedding, final norm, lm_head, token pick), or the
    # lm_head's bytes (generation computes the logits of the last token only).
    dense += step if step is not None else rates.weights_s(lm_head, 1)
    hit = cpu = transfer = background = overlap = contention = 0.0
    copy_s = rates.copy_s()
    for layer in work.layers:
        h, c, t = _layer_experts_s(rates, layer, work.tokens)
        hit, cpu, transfer = hit + h, cpu + c, transfer + t
        background += layer.background_copies * copy_s
        k = rates.contention_s(layer.background_copies, c)  # on the CPU side of the layer
        contention += k
        if rates.on_gpu and CPU_OVERLAPS_ACCELERATOR:  # accelerator side (hits, transfers) beside the CPU side
            overlap -= (h + t + c + k) - max(h + t, c + k)
    sync = rates.host_sync_s() * HOST_SYNCS_PER_MOE_LAYER * len(work.layers)
    busy = dense + hit + cpu + transfer + overlap + sync + contention + books
    # On a GPU background copies share the pass's time with the compute; on the CPU they are serial work.
    excess = max(0.0, background - busy) if rates.on_gpu else background
    return Breakdown(dense_s=dense, hit_s=hit, cpu_miss_s=cpu, transfer_s=transfer, background_copy_s=background,
                     copy_excess_s=excess, overlap_s=overlap, total_s=busy + excess, host_sync_s=sync,
                     copy_contention_s=contention, policy_s=books)


def policy_books_s(profile: Any, shape: ModelShape, plan: Plan) -> tuple[float, float, str | None]:
    """Seconds a decode pass and a prefill pass spend in the MoE layers' cache bookkeeping, and a note where
    the profile cannot say.

    The runtime calls `route_pass` once a pass in a MoE layer (runtime/moe_layer.py): for a decode token
    unless the layer `caches_nothing` at one token (no slots, and the miss rule sends no one-token miss to
    the accelerator); for a prefill pass always, where a layer without slots and without transfers has next
    to nothing to keep, so only layers with slots or transfers are charged. Each costs the profile's
    `cpu.policy_step` time for the plan's policy at the model's expert count and top-k, interpolated over
    the layer's slots (timed with promotion on: an upper bound for plans that do not promote)."""
    policy, rule = plan.cache.policy, plan.miss.rule
    per_layer = plan.cache.slots_per_layer(shape.num_moe_layers, shape.num_experts)
    decode = [n for n in per_layer if n > 0 or rule.on_accelerator(1)]
    prefill = [n for n in per_layer if n > 0 or rule.ever_on_accelerator]
    if not prefill:
        return 0.0, 0.0, None
    rows = {r.slots: r.median_s for r in profile.cpu.policy_step
            if (r.policy, r.experts, r.top_k) == (policy, shape.num_experts, shape.top_k)}
    if not rows:
        return 0.0, 0.0, (f"the profile has no cpu.policy_step rows for policy {policy} at {shape.num_experts} "
                          f"experts, top-{shape.top_k}: the cache's bookkeeping ({len(decode)} MoE layers a decode "
                          f"token, {len(prefill)} a prefill pass) is not charged (`moeplan profile --model` of "
                          "this model times it)")
    return (sum(interpolate(rows, max(n, 1)) for n in decode), sum(interpolate(rows, max(n, 1)) for n in prefill),
            None)


def _layer_experts_s(rates: _Rates, layer: LayerWork, tokens: int) -> tuple[float, float, float]:
    """Seconds of one MoE layer's hits, CPU misses and transfers (their copies included), along the path
    runtime/moe_layer.py takes for them; per expert from `cpu_expert_seconds` when the profile did not time
    this model's experts through those paths."""
    copies = sum(layer.transfers.values()) * rates.copy_s()
    moe_rows = rates.has_moe_rows
    if rates.on_gpu or not moe_rows:
        # Hits and transfers on the accelerator (or, without rows, each expert as its own call); CPU misses
        # through `CpuExecutor.run`, one call for all of a pass's.
        cpu = (sum(rates.run_s(n, t) for t, n in layer.cpu_misses.items() if n) if moe_rows
               else _group_s(layer.cpu_misses, rates.cpu_expert_s))
        computes = _group_s(layer.transfers, rates.slot_expert_s)
        moved = sum(layer.transfers.values())
        transfer = (pipelined_transfers_s(moved, copies, computes) if rates.on_gpu and TRANSFER_BUFFERS >= 2
                    else copies + computes)
        return _group_s(layer.hits, rates.slot_expert_s), cpu, transfer
    # A CPU plan. Several tokens: `MoeLayer._pass`, hits and transfers by torch from their slots, the CPU
    # misses in one `CpuExecutor.run`.
    if tokens > 1:
        return (_group_s(layer.hits, rates.torch_s), sum(rates.run_s(n, t) for t, n in layer.cpu_misses.items() if n),
                _group_s(layer.transfers, rates.torch_s) + copies)
    # One token: all its experts, from slots or host memory, in one fused `CpuExecutor.token` call, unless
    # the layer copies a miss into the cache first (a transfer): that pass goes through `_pass`. The replay
    # gives the mean counts per pass; a pass has a transfer with the probability that not all of its n
    # experts avoided one, each independently (n = top-k, transfers / n the chance for each).
    hits, misses, moved = (sum(g.values()) for g in (layer.hits, layer.cpu_misses, layer.transfers))
    n = hits + misses + moved
    if n <= 0:
        return 0.0, 0.0, copies
    fused = rates.moe_s("token", n, 1)
    if fused is None:  # the runtime does not take the fused path here (dtype, threads, layout): `_pass`
        through_pass = 1.0
    else:
        through_pass = 1.0 - (1.0 - moved / n) ** max(1, round(n)) if moved else 0.0
    # Experts that are not transfers, split between hits and CPU misses as the replay splits them.
    share_hits = hits / (hits + misses) if hits + misses else 0.0
    rest_in_pass = n - moved / through_pass if through_pass else 0.0  # per pass through `_pass`
    hit = through_pass * rest_in_pass * share_hits * rates.torch_s(1)
    cpu = through_pass * rates.run_s(rest_in_pass * (1.0 - share_hits), 1) if rest_in_pass * (1 - share_hits) else 0.0
    if fused is not None:
        hit += (1.0 - through_pass) * fused * share_hits
        cpu += (1.0 - through_pass) * fused * (1.0 - share_hits)
    return hit, cpu, moved * rates.torch_s(1) + copies


def pipelined_transfers_s(count: float, copies_s: float, computes_s: float) -> float:
    """A CUDA plan's layer of `count` transfers, double-buffered (`MoeLayer._transfers`): the copy of the
    next runs on the copy stream while this one is computed, so they cost the first copy, then for each
    further transfer the larger of a copy and a compute, then the last compute: c + k + (n - 1) max(c, k)
    for n transfers of mean copy c and compute k, about max(copies, computes) plus the first copy, where
    copy-then-compute would cost copies + computes. At most one transfer (the decode mean of passes with
    none or one): nothing overlaps."""
    if count <= 1:
        return copies_s + computes_s
    copy, compute = copies_s / count, computes_s / count
    return copy + compute + (count - 1) * max(copy, compute)


def _sum_breakdowns(parts: Sequence[Breakdown]) -> Breakdown:
    keys = Breakdown.__dataclass_fields__
    return Breakdown(**{k: sum(getattr(b, k) for b in parts) for k in keys})


def memory_plan(profile: Any, shape: ModelShape, plan: Plan, context: int, prompt_tokens: int,
                vram_budget: int | None = None) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Bytes per device, item by item (`runtime.contracts.memory`, the runtime's own accounting), and the
    bytes each device has: the profile's (free accelerator memory where measured, the card's total where
    published), or `vram_budget` for the accelerator. The KV cache holds the
    prompt and `context` tokens; the workspace is sized for the prompt's prefill."""
    on_gpu = plan.hardware.accelerator != "cpu"
    slots = sum(plan.cache.slots_per_layer(shape.num_moe_layers, shape.num_experts))
    items = memory_items(shape, slots, on_gpu, kv_tokens=context + prompt_tokens, pass_tokens=prompt_tokens,
                         rule=plan.miss.rule)
    limits = {"host": int(profile.host_memory_bytes)}
    if on_gpu:
        if vram_budget is not None:
            limits["accelerator"] = int(vram_budget)
        elif profile.has_accelerator:
            # what the runtime will find free: measured after the CUDA context was made, else the card's total
            acc = profile.accelerator
            limits["accelerator"] = int(acc.free_memory_bytes or acc.memory_bytes)
        else:
            limits["accelerator"] = 0
    return items, limits


def predict(profile: Any, shape: ModelShape, plan: Plan, sim: Any, context: int, prompt_tokens: int,
            vram_budget: int | None = None) -> Prediction:
    """Decode and prefill tokens/s and memory per device of `plan` for `shape` on `profile`'s host.

    `sim` is the simulator's replay of the workload's trace under the plan (`planner.routing.simulator.simulate`);
    `context` is the number of tokens in the KV cache at a decode step (on average), `prompt_tokens` the
    prompt length of the prefill. `vram_budget` (bytes) replaces the profile's accelerator memory.
    """
    on_gpu = plan.hardware.accelerator != "cpu"
    notes: list[str] = []
    if on_gpu and not profile.has_accelerator:
        notes.append(f"the profile has no accelerator but the plan asks for {plan.hardware.accelerator}")
    timing = expert_timing(profile, shape)
    rates = _Rates(profile=profile, shape=shape, on_gpu=on_gpu and profile.has_accelerator,
                   threads=plan.hardware.cpu_threads, cache=cache_state(profile, shape, context), experts=timing)
    if timing.note:
        notes.append(timing.note)
    if rates.on_gpu and profile.accelerator.host_sync_s is None:
        notes.append("the profile has no accelerator.host_sync_s: the MoE layers' host syncs are not charged")
    if profile.llc_bytes is not None:
        notes.append(f"CPU timings {rates.cache}: a decode token reads {decode_bytes(shape, context) / 2**20:.1f} MiB, "
                     f"the last-level cache holds {profile.llc_bytes / 2**20:.1f} MiB")
    decode_work, prefill_work = replay_work(sim, shape.num_moe_layers)
    decode_books, prefill_books, books_note = policy_books_s(profile, shape, plan)
    if books_note:
        notes.append(books_note)
    decode = _pass_breakdown(rates, decode_work, context, decode_books)
    # Prefill passes: each reads the weights once; its KV cache grows from 0 to the pass's tokens.
    prefill_parts = [_pass_breakdown(rates, w, w.tokens // 2, prefill_books) for w in prefill_work]
    prefill = _sum_breakdowns(prefill_parts) if prefill_parts else _pass_breakdown(rates, PassWork(0, ()), 0)
    prefill_tokens = sum(w.tokens for w in prefill_work)
    if not prefill_parts:
        notes.append("the replay has no prefill pass: prefill_tokens_per_s is 0")
    if prefill_tokens and prefill_tokens != prompt_tokens:
        notes.append(f"the replay's prefill has {prefill_tokens} tokens, not prompt_tokens {prompt_tokens}")

    items, limits = memory_plan(profile, shape, plan, context, prompt_tokens, vram_budget)
    memory = {device: sum(parts.values()) for device, parts in items.items()}
    fits = True
    for device, need in memory.items():
        if need > limits[device]:
            fits = False
            notes.append(f"{device}: needs {need / 2**30:.2f} GiB ({need} bytes) but has "
                         f"{limits[device] / 2**30:.2f} GiB ({limits[device]} bytes)")
    return Prediction(
        decode_tokens_per_s=1.0 / decode.total_s if decode.total_s > 0 else 0.0,
        prefill_tokens_per_s=prefill_tokens / prefill.total_s if prefill.total_s > 0 else 0.0,
        hit_rate=float(sim.hit_rate),
        fits=fits, memory_bytes=memory, memory_limit_bytes=limits, decode=decode, prefill=prefill,
        memory_items=items, notes=tuple(notes))


def replay_work(sim: Any, num_moe_layers: int) -> tuple[PassWork, list[PassWork]]:
    """The decode work (mean per pass) and each prefill pass's work, from a `planner.routing.simulator.SimResult`.

    The replay counts experts and token-expert pairs per pass, summed over the MoE layers. Each layer
    is given an equal share, and each expert of a group the group's mean token count: exact for
    batch-1 decode (one token per expert), an approximation for prefill (see docs/explain.md).
    """
    return _pass_work(sim.decode, num_moe_layers), [_pass_work(c, num_moe_layers) for c in sim.prefill]


def _pass_work(c: Any, layers: int) -> PassWork:
    def group(count: float, tokens: float) -> dict[int, float]:
        if count <= 0:
            return {}
        return {max(1, round(tokens / count)): count / layers}

    layer = LayerWork(hits=group(c.hits, c.hit_tokens), cpu_misses=group(c.cpu_misses, c.cpu_miss_tokens),
                      transfers=group(c.accelerator_misses, c.accelerator_miss_tokens),
                      background_copies=(c.promotions + c.prefetches) / layers)
    return PassWork(tokens=round(c.tokens), layers=(layer,) * layers)
