"""The accelerator part of a profiling run (only when `torch.cuda.is_available()`): jobs that fill the
profile's `accelerator` section, and its fits.

Cannot run on a CPU-only host; bench/device_check.sh runs it on a GPU machine.
"""
from __future__ import annotations

import gc
from collections.abc import Callable, Sequence

import torch

from .records import DenseRow, ExpertRow
from .fit import fit_layer_overhead
from .measure_cuda import (accelerator_facts, gpu_expert_pool, l2_bytes, matmul_side, matmul_tflops,
                            memory_read_gbps, rate_from_largest, time_gpu_expert, time_host_sync,
                            time_registered_h2d, time_transfer, transfer_sizes)
from .measure_dense import DenseLayerBench, LayerShape
from .settings import (OVERHEAD_SHAPE, Results, Settings, dense_row, router_width, significant,
                       unique_attention_shapes, unique_expert_shapes)



def accelerator_jobs(shapes: Sequence[LayerShape], settings: Settings, device: torch.device, r: Results
                     ) -> list[tuple[str, Callable[[], None]]]:

    s = settings
    acc: dict[str, object] = {}
    transfers: list[dict[str, object]] = []
    experts: list[ExpertRow] = []
    dense: list[DenseRow] = []
    state: dict[str, object] = {}
    sync = (lambda: torch.cuda.synchronize(device))
    jobs: list[tuple[str, Callable[[], None]]] = []

    def facts() -> None:
        acc.update(accelerator_facts(device))

    jobs.append(("accelerator facts", facts))

    def transfer_job(direction: str, pinned: bool, nbytes: int) -> Callable[[], None]:
        def run() -> None:
            t = time_transfer(device, direction, pinned, nbytes, warmup=s.warmup, repeats=s.repeats,
                              min_seconds=s.min_seconds)
            transfers.append({"direction": direction, "pinned": pinned, "bytes": nbytes,
                              "median_s": significant(t.median_s), "spread": round(t.spread, 3)})
        return run

    free = torch.cuda.mem_get_info(device)[0]
    for direction in ("h2d", "d2h"):
        for pinned in (True, False):
            for nbytes in transfer_sizes(s.quick, free):
                kind = "pinned" if pinned else "pageable"
                jobs.append((f"{direction} {kind} {nbytes >> 20} MiB", transfer_job(direction, pinned, nbytes)))

    def registered() -> None:
        nbytes = max(transfer_sizes(s.quick, free))
        t = time_registered_h2d(device, nbytes, warmup=s.warmup, repeats=s.repeats, min_seconds=s.min_seconds)
        acc["h2d_registered_gbps"] = significant(nbytes / t.median_s / 1e9)

    jobs.append(("h2d from memory registered in place", registered))

    def host_sync() -> None:
        # a decode token's fetch on a large model: ids and gate weights (a few bytes) and hidden states
        nbytes = max((shape.hidden for shape in shapes), default=4096) * 4 + 64
        t = time_host_sync(device, nbytes, warmup=s.warmup, repeats=max(s.repeats, 50))
        acc["host_sync_s"] = significant(t.median_s)

    jobs.append(("host sync round trip", host_sync))

    def bandwidth() -> None:
        # Far beyond the L2 (tens of MB), within an eighth of free memory.
        nbytes = min(max(1 << 30, 8 * l2_bytes(device)), max(1 << 26, torch.cuda.mem_get_info(device)[0] // 8))
        acc["memory_bandwidth_gbps"] = significant(memory_read_gbps(device, nbytes, warmup=s.warmup, repeats=s.repeats))

    jobs.append(("accelerator memory bandwidth", bandwidth))

    def tflops(dtype: str) -> Callable[[], None]:
        def run() -> None:
            side = matmul_side(torch.cuda.mem_get_info(device)[0])
            rates = acc.setdefault("matmul_tflops", {})
            rates[dtype] = significant(matmul_tflops(device, dtype, side, warmup=s.warmup, repeats=s.repeats))  # type: ignore
        return run

    for dtype in s.dtypes:
        jobs.append((f"accelerator matmul {dtype}", tflops(dtype)))

    def overhead() -> None:
        pool = gpu_expert_pool(*OVERHEAD_SHAPE, "float32", device)
        t = time_gpu_expert(pool, 1, warmup=s.warmup, repeats=max(s.repeats, 20))
        acc["kernel_overhead_s"] = significant(t.median_s)

    jobs.append(("accelerator expert call overhead", overhead))

    def expert_job(shape: LayerShape, dtype: str, tokens: int, last: bool) -> Callable[[], None]:
        def run() -> None:
            key = f"gpu pool {shape.hidden}x{shape.intermediate} {dtype}"
            if key not in state:
                state[key] = gpu_expert_pool(shape.hidden, shape.intermediate, dtype, device)
            t = time_gpu_expert(state[key], tokens, warmup=s.warmup, repeats=s.repeats,  # type: ignore[arg-type]
                                min_seconds=s.min_seconds)
            experts.append(ExpertRow(hidden=shape.hidden, intermediate=shape.intermediate, dtype=dtype,
                                     tokens=tokens, median_s=significant(t.median_s), spread=round(t.spread, 3)))
            if last:
                del state[key]
                gc.collect()
                torch.cuda.empty_cache()
        return run

    for shape in unique_expert_shapes(shapes):
        for dtype in s.dtypes:
            for j, tok in enumerate(s.tokens):
                jobs.append((f"accelerator expert {shape.hidden}x{shape.intermediate} {dtype}, {tok} tokens",
                             expert_job(shape, dtype, tok, last=j == len(s.tokens) - 1)))

    def flush_l2() -> None:
        buf = state.get("l2_flush")
        if buf is None:
            buf = state["l2_flush"] = torch.ones(max(1 << 20, 2 * l2_bytes(device)) // 4, device=device)
        buf.sum()  # type: ignore[union-attr]
        sync()  # the flush's kernel finishes before the timed span starts, not inside it

    def dense_job(shape: LayerShape, dtype: str, tokens: int, context: int, last: bool) -> Callable[[], None]:
        def run() -> None:
            key = f"gpu dense {shape.name} {dtype}"
            if key not in state:
                state[key] = DenseLayerBench(shape, dtype, device)
            t = state[key].time(tokens, context, warmup=s.warmup, repeats=s.repeats,  # type: ignore[union-attr]
                                min_seconds=s.min_seconds, flush=flush_l2, sync=sync)
            dense.append(dense_row(shape, dtype, None, tokens, context, t))
            if last:
                del state[key]
        return run

    for shape in unique_attention_shapes(shapes):
        for dtype in s.dtypes:
            cases = [(1, c) for c in s.contexts] + [(s.prefill, s.prefill)]
            for j, (tok, ctx) in enumerate(cases):
                jobs.append((f"accelerator dense layer {shape.name} {dtype}, {tok} tokens, context {ctx}",
                             dense_job(shape, dtype, tok, ctx, last=j == len(cases) - 1)))

    def finish() -> None:
        state.clear()
        gc.collect()
        torch.cuda.empty_cache()
        acc["transfers"] = transfers
        for direction in ("h2d", "d2h"):
            for pinned in (True, False):
                rate = rate_from_largest(transfers, direction, pinned)
                if rate is not None:
                    acc[f"{direction}_{'pinned' if pinned else 'pageable'}_gbps"] = significant(rate)
        acc["expert_ffn"] = [{k: v for k, v in vars(x).items() if v is not None} for x in experts]
        acc["dense_layer"] = [{k: v for k, v in vars(x).items() if v is not None} for x in dense]
        bw = acc.get("memory_bandwidth_gbps")
        if bw:
            fitted = fit_layer_overhead(dense, lambda row: float(bw), router_width(shapes))  # type: ignore[arg-type]
            if fitted is not None:
                acc["layer_overhead_s"] = significant(fitted)
        r.accelerator = acc

    jobs.append(("accelerator fits", finish))
    return jobs
