"""One profiling run: the list of measurements, run in order with progress, and the fits, as a profile dict.

`measure_profile(shapes, settings, progress=..., accelerator=...)` returns the dict that
`planner.profile.Profile.from_dict` validates; `moeplan profile` saves it. The measurements and their
order are laid out first (`plan_jobs`) so that the progress bar knows its total before anything runs.
"""
from __future__ import annotations

import datetime as _dt
import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .profile import DenseRow, ExpertRow
from .profile_fit import fit_expert_rates, fit_layer_overhead
from .profiler import ExpertPool, StreamBuffer, Timing, host_facts, thread_counts, time_cpu_expert
from .profiler_dense import DenseLayerBench, LayerShape

log = logging.getLogger(__name__)

# The expert that times the fixed cost of an expert call: small enough that its arithmetic and bytes vanish.
OVERHEAD_SHAPE = (64, 64)
Progress = Callable[[int, int, str], None]  # (done, total, label of the step about to run)


@dataclass(frozen=True)
class Settings:
    """What a run measures and how hard. `for_run(quick)` gives the documented defaults."""
    quick: bool
    dtypes: tuple[str, ...]  # expert kernel and dense layer dtypes
    tokens: tuple[int, ...]  # token counts of the expert kernel
    contexts: tuple[int, ...]  # decode contexts of the dense layer
    prefill: int  # tokens of the dense layer's prefill row
    stream_bytes: int  # DRAM read buffer
    warmup: int
    repeats: int
    min_seconds: float  # keep repeating a cheap measurement until this much timed time has passed
    pool_bytes: int | None = None  # expert pool size; None: twice the LLC (at least 256 MiB)
    threads: tuple[int, ...] | None = None  # None: `thread_counts(physical cores, quick)`

    @classmethod
    def for_run(cls, quick: bool) -> "Settings":
        if quick:
            return cls(quick=True, dtypes=("bfloat16", "float32"), tokens=(1, 8, 64), contexts=(512,), prefill=128,
                       stream_bytes=1 << 30, warmup=1, repeats=3, min_seconds=0.05)
        return cls(quick=False, dtypes=("bfloat16", "float32", "float16"),
                   tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256), contexts=(128, 512, 2048), prefill=512,
                   stream_bytes=1 << 30, warmup=2, repeats=5, min_seconds=0.3)


@dataclass
class _Results:
    host: dict[str, object] = field(default_factory=dict)
    memory: dict[int, float] = field(default_factory=dict)
    overhead: dict[int, float] = field(default_factory=dict)
    expert_rows: list[ExpertRow] = field(default_factory=list)
    dense_rows: list[DenseRow] = field(default_factory=list)
    accelerator: dict[str, object] | None = None


def measure_profile(shapes: Sequence[LayerShape], settings: Settings, *, name: str,
                    progress: Progress | None = None, accelerator: torch.device | None = None) -> dict[str, object]:
    """Measure this host for `shapes` and return the profile as a dict (schema version 1)."""
    threads_before = torch.get_num_threads()
    try:
        jobs, results = plan_jobs(shapes, settings, accelerator)
        for i, (label, job) in enumerate(jobs):
            if progress is not None:
                progress(i, len(jobs), label)
            t0 = time.perf_counter()
            job()
            log.debug("%6.2f s  %s", time.perf_counter() - t0, label)
        if progress is not None:
            progress(len(jobs), len(jobs), "done")
    finally:
        torch.set_num_threads(threads_before)
    return _assemble(results, shapes, name)


def plan_jobs(shapes: Sequence[LayerShape], settings: Settings, accelerator: torch.device | None
              ) -> tuple[list[tuple[str, Callable[[], None]]], _Results]:
    """The measurements in run order, as (label, callable) pairs that fill the returned results."""
    s = settings
    r = _Results()
    r.host = host_facts()
    physical = int(r.host["physical_cores"])  # type: ignore[arg-type]
    threads = list(s.threads) if s.threads else thread_counts(physical, s.quick)
    state: dict[str, object] = {}
    jobs: list[tuple[str, Callable[[], None]]] = []

    def stream() -> StreamBuffer:
        if "stream" not in state:
            state["stream"] = StreamBuffer(s.stream_bytes)
        return state["stream"]  # type: ignore[return-value]

    def memory_job(n: int) -> Callable[[], None]:
        def run() -> None:
            rate, t = stream().read_gbps(n, warmup=s.warmup, repeats=s.repeats)
            r.memory[n] = rate
            log.debug("memory read, %d threads: %.2f GB/s (spread %.2f)", n, rate, t.spread)
        return run

    for n in threads:
        jobs.append((f"DRAM read, {n} threads", memory_job(n)))

    def overhead_job(n: int) -> Callable[[], None]:
        def run() -> None:
            h, i = OVERHEAD_SHAPE
            pool = state.setdefault("overhead_pool", ExpertPool(h, i, "float32", pool_bytes=0))
            t = time_cpu_expert(h, i, "float32", 1, n, pool=pool, warmup=s.warmup, repeats=max(s.repeats, 20))
            r.overhead[n] = t.median_s
        return run

    for n in threads:
        jobs.append((f"expert call overhead, {n} threads", overhead_job(n)))

    def expert_job(shape: LayerShape, dtype: str, n: int, tokens: int, last: bool) -> Callable[[], None]:
        def run() -> None:
            key = f"pool {shape.hidden}x{shape.intermediate} {dtype}"
            if key not in state:
                state[key] = ExpertPool(shape.hidden, shape.intermediate, dtype, pool_bytes=s.pool_bytes)
            t = time_cpu_expert(shape.hidden, shape.intermediate, dtype, tokens, n, pool=state[key],  # type: ignore
                                warmup=s.warmup, repeats=s.repeats, min_seconds=s.min_seconds)
            r.expert_rows.append(ExpertRow(hidden=shape.hidden, intermediate=shape.intermediate, dtype=dtype,
                                           threads=n, tokens=tokens, median_s=_sig(t.median_s),
                                           spread=round(t.spread, 3)))
            if last:  # free the pool (up to gigabytes) before the next shape builds its own
                del state[key]
                gc.collect()
        return run

    for shape in _unique_expert_shapes(shapes):
        for dtype in s.dtypes:
            pairs = [(n, tok) for n in threads for tok in s.tokens]
            for j, (n, tok) in enumerate(pairs):
                jobs.append((f"expert {shape.hidden}x{shape.intermediate} {dtype}, {n} threads, {tok} tokens",
                             expert_job(shape, dtype, n, tok, last=j == len(pairs) - 1)))

    def dense_job(shape: LayerShape, dtype: str, n: int, tokens: int, context: int, last: bool
                  ) -> Callable[[], None]:
        def run() -> None:
            key = f"dense {shape.name} {dtype}"
            if key not in state:
                state[key] = DenseLayerBench(shape, dtype, "cpu")
            torch.set_num_threads(n)
            t = state[key].time(tokens, context, warmup=s.warmup, repeats=s.repeats,  # type: ignore[union-attr]
                                min_seconds=s.min_seconds, flush=stream().flush)
            r.dense_rows.append(_dense_row(shape, dtype, n, tokens, context, t))
            if last:
                del state[key]
        return run

    for shape in _unique_attention_shapes(shapes):
        for dtype in s.dtypes:
            # A quick run times the dense part with all cores only (as the runtime runs it).
            dense_threads = threads[-1:] if s.quick else threads
            cases = ([(n, 1, c) for n in dense_threads for c in s.contexts]
                     + [(n, s.prefill, s.prefill) for n in dense_threads])
            for j, (n, tok, ctx) in enumerate(cases):
                what = f"{tok} tokens" if tok == ctx else f"1 token at context {ctx}"
                jobs.append((f"dense layer {shape.name} {dtype}, {n} threads, {what}",
                             dense_job(shape, dtype, n, tok, ctx, last=j == len(cases) - 1)))

    if accelerator is not None:
        from .profiler_run_cuda import accelerator_jobs
        jobs.append(("free host buffers", lambda: (state.clear(), gc.collect(), None)[-1]))
        jobs.extend(accelerator_jobs(shapes, settings, accelerator, r))
    return jobs, r


def _dense_row(shape: LayerShape, dtype: str, threads: int | None, tokens: int, context: int, t: Timing) -> DenseRow:
    return DenseRow(hidden=shape.hidden, heads=shape.heads, kv_heads=shape.kv_heads,
                    head_dim=None if shape.head_dim == shape.hidden // shape.heads else shape.head_dim,
                    dtype=dtype, threads=threads, tokens=tokens, context=context, median_s=_sig(t.median_s),
                    spread=round(t.spread, 3))


def _unique_expert_shapes(shapes: Sequence[LayerShape]) -> list[LayerShape]:
    seen, out = set(), []
    for sh in shapes:
        if (sh.hidden, sh.intermediate) not in seen:
            seen.add((sh.hidden, sh.intermediate))
            out.append(sh)
    return out


def _unique_attention_shapes(shapes: Sequence[LayerShape]) -> list[LayerShape]:
    seen, out = set(), []
    for sh in shapes:
        key = (sh.hidden, sh.heads, sh.kv_heads, sh.head_dim)
        if key not in seen:
            seen.add(key)
            out.append(sh)
    return out


def _sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits: measurements are not more precise, and the file stays readable."""
    return float(f"{x:.{digits - 1}e}")


def router_width(shapes: Sequence[LayerShape]) -> Callable[[DenseRow], int]:
    """The router width of the shape a dense row was measured for."""
    by_key = {(sh.hidden, sh.heads, sh.kv_heads, sh.head_dim): sh.num_experts for sh in shapes}

    def width(row: DenseRow) -> int:
        head_dim = row.head_dim or row.hidden // row.heads
        return by_key.get((row.hidden, row.heads, row.kv_heads, head_dim), 0)
    return width


def _assemble(r: _Results, shapes: Sequence[LayerShape], name: str) -> dict[str, object]:
    # One fixed cost per expert call: the least over thread counts. What more threads add (waking and
    # joining the pool) then lands in that thread count's fitted rates, so the formula still reproduces
    # the measured times there.
    overhead = min(r.overhead.values()) if r.overhead else 0.0
    gbps, gflops = fit_expert_rates(r.expert_rows, overhead)
    layer_overhead = fit_layer_overhead(r.dense_rows, lambda row: r.memory[row.threads],  # type: ignore[index]
                                        router_width(shapes))
    cpu: dict[str, object] = {
        "memory_read_gbps": {n: _sig(v) for n, v in sorted(r.memory.items())},
        "expert_gbps": {dt: {n: _sig(v) for n, v in c.items()} for dt, c in gbps.items()} or None,
        "expert_gflops": {dt: {n: _sig(v) for n, v in c.items()} for dt, c in gflops.items()} or None,
        "expert_overhead_s": _sig(overhead) if r.overhead else None,
        "layer_overhead_s": None if layer_overhead is None else _sig(layer_overhead),
        "expert_ffn": [_row(x) for x in r.expert_rows],
        "dense_layer": [_row(x) for x in r.dense_rows],
    }
    return {
        "version": 1,
        "name": name,
        "source": "measured",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": r.host,
        "cpu": {k: v for k, v in cpu.items() if v is not None},
        "accelerator": r.accelerator,
    }


def _row(row: object) -> dict[str, object]:
    return {k: v for k, v in vars(row).items() if v is not None}

