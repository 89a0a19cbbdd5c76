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
  (transfers) wait for their copy. With a GPU the two sides overlap: the layer costs
  max(accelerator side, CPU side). With `accelerator: cpu` everything runs on the CPU, one after another,
  and a "copy" is a host memory copy.
- background copies (promotion after a CPU miss, prefetch) use the PCIe link while the rest runs; only
  the part that exceeds the pass's time lands on the critical path. On the CPU they are memory copies
  done by the same threads, so they count in full.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from runtime.plan import Plan

from .catalog import ModelShape
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
    total_s: float  # dense + hit + cpu_miss + transfer + copy_excess + overlap

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
class _Rates:
    """The profile's rates for one plan: where the dense part and the hits run, and how fast copies go."""

    profile: Any
    shape: ModelShape
    on_gpu: bool
    threads: int

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

    def measured_layer_s(self, tokens: int, context: int) -> float | None:
        """One decoder layer without experts (attention with KV cache, norms, router), from the profile's
        dense_layer table when it measured this model's attention shape and dtype; else None.

        Interpolated over the context (rows of the same tokens), then over threads (CPU rows), clamped
        at the ends; a prefill measured at another length is scaled by tokens.
        """
        s = self.shape
        if s.attention_params_override:  # MLA: the table's rows are plain attention
            return None
        side = self.profile.accelerator if self.on_gpu else self.profile.cpu
        rows = [r for r in side.dense_layer
                if (r.hidden, r.heads, r.kv_heads, r.dtype) == (s.hidden, s.num_heads, s.num_kv_heads, s.dtype)
                and (r.head_dim or r.hidden // r.heads) == s.head_dim]
        decode = tokens <= 1
        rows = [r for r in rows if (r.tokens == 1) == decode]
        if not rows:
            return None
        by_threads: dict[int, dict[int, float]] = {}
        for r in rows:
            x = r.context if decode else r.tokens
            by_threads.setdefault(r.threads or 0, {})[x] = r.median_s
        x = context if decode else tokens
        per_threads = {n: interpolate(points, x) for n, points in by_threads.items()}
        value = interpolate(per_threads, self.threads)
        if not decode:
            longest = max(max(points) for points in by_threads.values())
            value *= max(1.0, x / longest)  # beyond the measured prefill: linear in tokens
        return value

    def layer_overhead_s(self) -> float:
        value, where = ((self.profile.accelerator.layer_overhead_s, "accelerator.layer_overhead_s") if self.on_gpu
                        else (self.profile.cpu.layer_overhead_s, "cpu.layer_overhead_s"))
        return _need(self.profile, value, where)

    def slot_expert_s(self, tokens: int) -> float:
        s = self.shape
        if self.on_gpu:
            return self.profile.accelerator_expert_seconds(s.hidden, s.expert_intermediate, s.dtype, tokens)
        return self.cpu_expert_s(tokens)

    def cpu_expert_s(self, tokens: int) -> float:
        s = self.shape
        return self.profile.cpu_expert_seconds(s.hidden, s.expert_intermediate, s.dtype, tokens, self.threads)

    def copy_s(self) -> float:
        """One expert into a slot: PCIe from pinned memory, or a host memory copy (read + write)."""
        if self.on_gpu:
            return self.profile.h2d_seconds(self.shape.expert_bytes, pinned=True)
        return 2 * self.shape.expert_bytes / (self.profile.memory_read_gbps(self.threads) * 1e9)


def _need(profile: Any, value: float | None, field_path: str) -> float:
    if value is None:
        raise ProfileError(f"profile {profile.name}: {field_path}: missing, and the cost model needs it")
    return value


def _group_s(group: Mapping[int, float], seconds_per_expert) -> float:
    return sum(count * seconds_per_expert(tokens) for tokens, count in group.items() if count)


def _pass_breakdown(rates: _Rates, work: PassWork, context: int) -> Breakdown:
    shape = rates.shape
    lm_head = shape.vocab * shape.hidden * shape.dtype_bytes
    measured = rates.measured_layer_s(work.tokens, context)
    if measured is not None:
        # The table covers attention, KV cache, norms and router; shared experts and dense MLPs are
        # the weights beyond those.
        attention = shape.attention_params + 2 * shape.hidden
        moe = set(shape.moe_layers)
        mlp = sum(n - attention - (shape.hidden * shape.num_experts if i in moe else 0)
                  for i, n in enumerate(shape.dense_params_per_layer))
        dense = shape.num_layers * measured + rates.weights_s(mlp * shape.dtype_bytes, work.tokens)
    else:
        kv_read = shape.kv_bytes_per_token * context  # every layer's KV cache, read once a pass
        layer_weights = sum(shape.dense_params_per_layer) * shape.dtype_bytes
        dense = (rates.weights_s(layer_weights, work.tokens) + kv_read / rates.bandwidth_bps()
                 + shape.num_layers * rates.layer_overhead_s())
    dense += rates.weights_s(lm_head, 1)  # generation computes the logits of the last token only
    hit = cpu = transfer = background = overlap = 0.0
    for layer in work.layers:
        h = _group_s(layer.hits, rates.slot_expert_s)
        c = _group_s(layer.cpu_misses, rates.cpu_expert_s)
        t = _group_s(layer.transfers, rates.slot_expert_s) + sum(layer.transfers.values()) * rates.copy_s()
        hit, cpu, transfer = hit + h, cpu + c, transfer + t
        background += layer.background_copies * rates.copy_s()
        if rates.on_gpu:  # accelerator side (hits, transfers) beside the CPU side (misses)
            overlap -= (h + t + c) - max(h + t, c)
    busy = dense + hit + cpu + transfer + overlap
    # On a GPU background copies share the pass's time with the compute; on the CPU they are serial work.
    excess = max(0.0, background - busy) if rates.on_gpu else background
    return Breakdown(dense_s=dense, hit_s=hit, cpu_miss_s=cpu, transfer_s=transfer, background_copy_s=background,
                     copy_excess_s=excess, overlap_s=overlap, total_s=busy + excess)


def _sum_breakdowns(parts: Sequence[Breakdown]) -> Breakdown:
    keys = Breakdown.__dataclass_fields__
    return Breakdown(**{k: sum(getattr(b, k) for b in parts) for k in keys})


def memory_plan(profile: Any, shape: ModelShape, plan: Plan, context: int, prompt_tokens: int,
                vram_budget: int | None = None) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Bytes per device, item by item, and the bytes each device has.

    Workspace: the largest activations of a prefill pass held at once, in the activation dtype:
    hidden states and residual (2 x T x H), q/k/v/o (4 x T x H), the gate/up output of one expert call
    (2 x T x I), float32 logits of the last token (V x 4), plus one expert of scratch for misses
    computed on the accelerator outside the cache.
    """
    on_gpu = plan.hardware.accelerator != "cpu"
    slots = sum(plan.cache.slots_per_layer(shape.num_moe_layers, shape.num_experts))
    tokens = max(prompt_tokens, 1)
    widest = max(shape.expert_intermediate, shape.shared_expert_intermediate, shape.dense_intermediate)
    workspace = int(tokens * (6 * shape.hidden + 2 * widest) * shape.dtype_bytes + shape.vocab * 4
                    + shape.expert_bytes)
    kv = shape.kv_bytes_per_token * (context + prompt_tokens)
    cache = slots * shape.expert_bytes
    dense_and_kv = {"dense_weights": shape.dense_bytes, "kv_cache": kv, "expert_slots": cache,
                    "workspace": workspace}
    host = {"experts_all": shape.expert_bytes_total}
    items: dict[str, dict[str, int]] = {}
    if on_gpu:
        items["accelerator"] = dense_and_kv
        host["dense_weights_while_loading"] = shape.dense_bytes  # read from disk, then moved to the GPU
    else:
        host.update(dense_and_kv)  # with accelerator: cpu the slots are copies in host memory
    items["host"] = host
    limits = {"host": int(profile.host_memory_bytes)}
    if on_gpu:
        if vram_budget is not None:
            limits["accelerator"] = int(vram_budget)
        elif profile.has_accelerator:
            limits["accelerator"] = int(profile.accelerator_memory_bytes)
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
    rates = _Rates(profile=profile, shape=shape, on_gpu=on_gpu and profile.has_accelerator,
                   threads=plan.hardware.cpu_threads)
    decode_work, prefill_work = replay_work(sim, shape.num_moe_layers)
    decode = _pass_breakdown(rates, decode_work, context)
    # Prefill passes: each reads the weights once; its KV cache grows from 0 to the pass's tokens.
    prefill_parts = [_pass_breakdown(rates, w, w.tokens // 2) for w in prefill_work]
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
