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

import torch

from runtime.contracts.expert_format import DEFAULT_GROUP_SIZE, check_group_size, is_quantized

from .records import DTYPE_BYTES, ExpertRow, LoopLayerRow, MoeRow, StepRow
from .fit import dense_layer_bytes, fit_copy_rate, fit_expert_rates, fit_layer_overhead
from .measure import ExpertPool, StreamBuffer, Timing, host_facts, thread_counts, time_cpu_expert
from .measure_dense import DecodeStepBench, DenseLayerBench, LayerShape
from .measure_moe import MoeLayerBench
from .measure_policy import time_policies
from .settings import OVERHEAD_SHAPE, Results, Settings, dense_row, router_width, significant

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (done, total, label of the step about to run)


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
              ) -> tuple[list[tuple[str, Callable[[], None]]], Results]:
    """The measurements in run order, as (label, callable) pairs that fill the returned results."""
    s = settings
    r = Results()
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

    llc = r.host.get("llc_bytes")
    llc = llc if isinstance(llc, int) else None

    def caches(nbytes: int) -> tuple[str, ...]:
        """Cold always; warm too when `nbytes` (what one call reads) fit the last-level cache, the only case
        where the cost model asks for warm figures (and a known cache size is needed to say so)."""
        return ("warm", "cold") if llc is not None and nbytes <= llc else ("cold",)

    def moe(shape: LayerShape, dtype: str) -> MoeLayerBench:
        """The shape's experts as one MoE layer, stored as `dtype` (a float dtype, or int8/int4 computing in
        `s.int_dtype`), on a pool with room for two calls' experts (a cold call never meets the last one's),
        built on first use and shared by the shape's timings in this format."""
        key = f"moe {shape.hidden}x{shape.intermediate} {dtype}"
        if key not in state:
            copies = 2 * shape.experts_per_token
            state[key] = (MoeLayerBench.quantized(shape.hidden, shape.intermediate, dtype, s.int_dtype,
                                                  pool_bytes=s.pool_bytes, min_copies=copies)
                          if is_quantized(dtype) else
                          MoeLayerBench(ExpertPool(shape.hidden, shape.intermediate, dtype, pool_bytes=s.pool_bytes,
                                                   min_copies=copies)))
        return state[key]  # type: ignore[return-value]

    def neighbour(shape: LayerShape, dtype: str, n: int, cache: str) -> Callable[[], object]:
        """The flush before each repeat of a dense or decode-step timing (MoeLayerBench.neighbour)."""
        return moe(shape, dtype).neighbour(shape.experts_per_token, n, cache, llc, stream)

    def expert_job(shape: LayerShape, dtype: str, n: int, tokens: int) -> Callable[[], None]:
        def run() -> None:
            if is_quantized(dtype):  # one int expert, cold, as the executor runs a miss: its quantized `run`
                t = moe(shape, dtype).time("run", 1, tokens, n, "cold", warmup=s.warmup, repeats=s.repeats,
                                           min_seconds=s.min_seconds)
            else:
                t = time_cpu_expert(shape.hidden, shape.intermediate, dtype, tokens, n, pool=moe(shape, dtype).pool,
                                    warmup=s.warmup, repeats=s.repeats, min_seconds=s.min_seconds)
            r.expert_rows.append(ExpertRow(hidden=shape.hidden, intermediate=shape.intermediate, dtype=dtype,
                                           threads=n, tokens=tokens, median_s=significant(t.median_s),
                                           spread=round(t.spread, 3)))
        return run

    def moe_job(shape: LayerShape, dtype: str, n: int, path: str) -> Callable[[], None]:
        def run() -> None:
            bench = moe(shape, dtype)
            k = shape.experts_per_token
            if path == "token":
                if not bench.fits_token(n):  # the runtime takes `run` and `torch` here: nothing to time
                    return
                cases = [(k, 1)]
            elif path == "run":  # one miss of one token (decode with a GPU), top-k misses at each token count
                cases = sorted({(1, 1)} | {(k, tok) for tok in s.moe_tokens})
            elif path == "torch":
                cases = [(1, tok) for tok in s.moe_tokens]
            else:  # host copy of one expert (a CPU plan's promotion)
                t = bench.time_copy(n, warmup=s.warmup, repeats=s.repeats, min_seconds=s.min_seconds)
                r.copies.setdefault(n, []).append((bench.expert_bytes, t.median_s))
                return
            for count, tok in cases:
                for cache in caches(count * bench.expert_bytes):
                    t = bench.time(path, count, tok, n, cache, warmup=s.warmup, repeats=s.repeats,
                                   min_seconds=s.min_seconds)
                    r.moe_rows.append(MoeRow(hidden=shape.hidden, intermediate=shape.intermediate, dtype=dtype,
                                             threads=n, path=path, experts=count, tokens=tok, cache=cache,
                                             median_s=significant(t.median_s), spread=round(t.spread, 3)))
        return run

    def dense_job(shape: LayerShape, dtype: str, n: int, tokens: int, context: int, cache: str) -> Callable[[], None]:
        def run() -> None:
            key = f"dense {shape.name} {dtype}"
            if key not in state:
                state[key] = DenseLayerBench(shape, dtype, "cpu")
            torch.set_num_threads(n)
            t = state[key].time(tokens, context, warmup=s.warmup, repeats=s.repeats,  # type: ignore[union-attr]
                                min_seconds=s.min_seconds, flush=neighbour(shape, dtype, n, cache))
            r.dense_rows.append(dense_row(shape, dtype, n, tokens, context, t, cache))
        return run

    def step_job(shape: LayerShape, dtype: str, n: int, cache: str) -> Callable[[], None]:
        def run() -> None:
            key = f"step {shape.name} {dtype}"
            if key not in state:
                state[key] = DecodeStepBench(shape, dtype, "cpu")
            torch.set_num_threads(n)
            step, layer, context = state[key].time_in_loop(  # type: ignore[union-attr]
                min(s.contexts), warmup=s.warmup, repeats=s.repeats, min_seconds=s.min_seconds,
                flush=neighbour(shape, dtype, n, cache))
            r.step_rows.append(StepRow(hidden=shape.hidden, vocab=shape.vocab, dtype=dtype, threads=n, cache=cache,
                                       median_s=significant(step.median_s), spread=round(step.spread, 3)))
            r.loop_rows.append(LoopLayerRow(
                hidden=shape.hidden, intermediate=shape.intermediate, heads=shape.heads, kv_heads=shape.kv_heads,
                head_dim=None if shape.head_dim == shape.hidden // shape.heads else shape.head_dim, dtype=dtype,
                threads=n, experts=shape.experts_per_token, context=round(context), cache=cache,
                median_s=significant(layer.median_s), spread=round(layer.spread, 3)))
        return run

    def free(*keys: str) -> Callable[[], None]:
        def run() -> None:  # a pool takes up to gigabytes: gone before the next shape builds its own
            for key in keys:
                state.pop(key, None)
            gc.collect()
        return run

    experts_done: set[tuple[int, int]] = set()
    attention_done: set[tuple[int, int, int, int]] = set()
    for shape in shapes:
        expert_key = (shape.hidden, shape.intermediate)
        attention_key = (shape.hidden, shape.heads, shape.kv_heads, shape.head_dim)
        time_experts, time_dense = expert_key not in experts_done, attention_key not in attention_done
        experts_done.add(expert_key)
        attention_done.add(attention_key)
        for dtype in s.dtypes:
            what = f"{shape.hidden}x{shape.intermediate} {dtype}"
            if time_experts:
                for n in threads:
                    for tok in s.tokens:
                        jobs.append((f"expert {what}, {n} threads, {tok} tokens", expert_job(shape, dtype, n, tok)))
                for n in threads:
                    for path in ("token", "run", "torch", "copy"):
                        label = (f"host copy of an expert {what}, {n} threads" if path == "copy"
                                 else f"MoE layer {what}, {path} path, {n} threads")
                        jobs.append((label, moe_job(shape, dtype, n, path)))
            if time_dense:
                def layer_bytes(tok: int, ctx: int, shape: LayerShape = shape, dtype: str = dtype) -> int:
                    return dense_layer_bytes(dense_row(shape, dtype, None, tok, ctx, _NO_TIME), shape.num_experts)
                cases = [(n, 1, c) for n in threads for c in s.contexts] + [(n, s.prefill, s.prefill) for n in threads]
                for n, tok, ctx in cases:
                    for cache in caches(layer_bytes(tok, ctx)):
                        what_dense = f"{tok} tokens" if tok == ctx else f"1 token at context {ctx}"
                        jobs.append((f"dense layer {shape.name} {dtype}, {n} threads, {what_dense}, {cache}",
                                     dense_job(shape, dtype, n, tok, ctx, cache)))
                if shape.vocab:
                    for n in threads:
                        for cache in caches(shape.vocab * shape.hidden * DTYPE_BYTES[dtype]):
                            jobs.append((f"decode step outside the layers {shape.name} {dtype}, {n} threads, {cache}",
                                         step_job(shape, dtype, n, cache)))
            jobs.append((f"free {shape.name} {dtype}", free(f"moe {what}", f"dense {shape.name} {dtype}",
                                                            f"step {shape.name} {dtype}")))
        # int8/int4 experts: the expert and MoE-layer rows of each format (no dense part), where the default
        # group size divides the shape's inputs (else no quantized checkpoint of it has that group size)
        groups_fit = all(check_group_size(DEFAULT_GROUP_SIZE, k) is None for k in (shape.hidden, shape.intermediate))
        if time_experts and groups_fit:
            for fmt in s.int_formats:
                what = f"{shape.hidden}x{shape.intermediate} {fmt}"
                for n in threads:
                    for tok in s.tokens:
                        jobs.append((f"expert {what}, {n} threads, {tok} tokens", expert_job(shape, fmt, n, tok)))
                for n in threads:
                    for path in ("token", "run", "torch"):
                        jobs.append((f"MoE layer {what}, {path} path, {n} threads", moe_job(shape, fmt, n, path)))
                jobs.append((f"free {what}", free(f"moe {what}")))

    for experts, top_k in dict.fromkeys((sh.num_experts, sh.experts_per_token) for sh in shapes):
        def policy_job(experts: int = experts, top_k: int = top_k) -> None:
            r.policy_rows.extend(time_policies(experts, top_k, s.repeats))
        jobs.append((f"cache policy bookkeeping, {experts} experts, top-{top_k}", policy_job))

    if accelerator is not None:
        from .run_cuda import accelerator_jobs
        jobs.append(("free host buffers", lambda: (state.clear(), gc.collect(), None)[-1]))
        jobs.extend(accelerator_jobs(shapes, settings, accelerator, r))
    return jobs, r


def _assemble(r: Results, shapes: Sequence[LayerShape], name: str) -> dict[str, object]:
    # One fixed cost per expert call: the least over thread counts. What more threads add (waking and
    # joining the pool) then lands in that thread count's fitted rates, so the formula still reproduces
    # the measured times there.
    overhead = min(r.overhead.values()) if r.overhead else 0.0
    gbps, gflops = fit_expert_rates(r.expert_rows, overhead)
    copy = {n: fit_copy_rate(pairs) for n, pairs in sorted(r.copies.items())}
    # The fitted formula (bytes at the DRAM rate + overhead) describes a layer read cold: fitted to cold rows.
    cold_rows = [row for row in r.dense_rows if row.cache in (None, "cold")]
    layer_overhead = fit_layer_overhead(cold_rows, lambda row: r.memory[row.threads],  # type: ignore[index]
                                        router_width(shapes))
    cpu: dict[str, object] = {
        "memory_read_gbps": {n: significant(v) for n, v in sorted(r.memory.items())},
        "memory_copy_gbps": {n: significant(v) for n, v in copy.items()} or None,
        "expert_gbps": {dt: {n: significant(v) for n, v in c.items()} for dt, c in gbps.items()} or None,
        "expert_gflops": {dt: {n: significant(v) for n, v in c.items()} for dt, c in gflops.items()} or None,
        "expert_overhead_s": significant(overhead) if r.overhead else None,
        "layer_overhead_s": None if layer_overhead is None else significant(layer_overhead),
        "expert_ffn": [_row(x) for x in r.expert_rows],
        "dense_layer": [_row(x) for x in r.dense_rows],
        "moe_layer": [_row(x) for x in r.moe_rows],
        "model_step": [_row(x) for x in r.step_rows],
        "decode_layer": [_row(x) for x in r.loop_rows],
        "policy_step": [_row(x) for x in r.policy_rows],
    }
    return {
        "version": 1,
        "name": name,
        "source": "measured",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": {k: v for k, v in r.host.items() if v is not None},
        "cpu": {k: v for k, v in cpu.items() if v is not None},
        "accelerator": r.accelerator,
    }


_NO_TIME = Timing(median_s=1.0, spread=0.0, repeats=1, min_s=1.0)  # a placeholder to size a row's bytes


def _row(row: object) -> dict[str, object]:
    return {k: v for k, v in vars(row).items() if v is not None}

