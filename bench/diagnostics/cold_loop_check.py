"""Is the profiler's cold decoder layer cold? Its one-layer loop against a layer of the real decode.

`moeplan profile` times a decoder layer inside the runtime's generation loop on a one-layer model
(`DecodeStepBench.time_in_loop`, the profile's `cpu.decode_layer` rows), with an untimed flush between
tokens: the MoE layer's experts for one token from a pool larger than the last-level cache, and for
`cold` rows some unrelated reads after them. That layer reads its own weights again at every token, and
an LLC that keeps lines by their reuse can hold part of them through the flush. Here, in one process
and in turns: the median time of a decoder layer inside the real decode of a model whose bytes per token
do not fit the cache (each layer timed through the native step's seam, first tokens skipped), and the
one-layer loop with the experts' call followed by 0, 1, 2 and 4 LLCs' worth of unrelated reads.

    .venv/bin/python bench/diagnostics/cold_loop_check.py [--model bench/models/mixtral-bench] [--threads 1] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from planner.catalog import load_model_shape  # noqa: E402
from planner.profile.measure import ExpertPool, StreamBuffer, llc_bytes  # noqa: E402
from planner.profile.measure_dense import DecodeStepBench, LayerShape  # noqa: E402
from planner.profile.measure_moe import MoeLayerBench  # noqa: E402
from report import cpu_line, emit  # noqa: E402
from runtime.plan import Plan  # noqa: E402
from runtime.session import Session  # noqa: E402

PROMPT = "def fibonacci(n):"
EVICTIONS = (0, 1, 2, 4)  # LLCs' worth of unrelated reads after the experts' call


def real_layer_s(session: Session, layers: int, tokens: int, skip: int) -> float:
    """Median time of one decoder layer over a generation's tokens after the first `skip`."""
    native = session.engine.native
    times: list[float] = []

    def around(index: int, run):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
        return out

    native.around_layer = around
    try:
        ids = session.loaded.tokenizer(PROMPT)["input_ids"]
        for _ in session.stream(ids, max_new_tokens=tokens, text=False):
            pass
    finally:
        native.around_layer = None
    return statistics.median(times[layers * skip:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "bench" / "models" / "mixtral-bench"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    m = load_model_shape(args.model)
    shape = LayerShape(m.name, m.hidden, m.expert_intermediate, m.num_heads, m.num_kv_heads, m.head_dim,
                       m.num_experts, m.top_k, m.vocab)
    k = shape.experts_per_token
    llc = llc_bytes()
    if llc is None:
        raise SystemExit("the last-level cache size is unknown here: nothing to check")
    pool = MoeLayerBench(ExpertPool(shape.hidden, shape.intermediate, m.dtype, min_copies=2 * k))
    stream = StreamBuffer(1 << 30)
    loop = DecodeStepBench(shape, m.dtype, "cpu")
    plan = Plan.from_dict({"version": 2, "model": {"name": m.name, "path": args.model, "dtype": m.dtype},
                           "hardware": {"accelerator": "cpu", "cpu_threads": args.threads},
                           "cache": {"slots": 0, "policy": "lru"}, "miss": {"compute": "cpu"}})
    session = Session.load(plan)
    if session.engine.native is None or not session.engine.native.enabled:
        raise SystemExit(f"{args.model}: the runtime does not decode it with its native step")

    def flush(llcs: int):  # the profiler's cold neighbour, with `llcs` LLCs of reads after the experts
        return pool.neighbour(k, args.threads, "cold", llc, lambda: stream, llcs=llcs)

    names = ["real decode", *(f"loop, experts + {n} LLC" for n in EVICTIONS)]
    ms: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        ms["real decode"].append(1e3 * real_layer_s(session, m.num_layers, tokens=24, skip=4))
        for n in EVICTIONS:
            t = loop.time_in_loop(32, warmup=2, repeats=7, min_seconds=0.3, flush=flush(n))[1]
            ms[f"loop, experts + {n} LLC"].append(1e3 * t.median_s)
        print(f"round {r}: " + ", ".join(f"{name} {v[-1]:.3f}" for name, v in ms.items()), file=sys.stderr)

    real = statistics.median(ms["real decode"])
    lines = [f"# Cold decoder layer: the profiler's loop against the real decode ({m.name}, {args.threads} threads)", "",
             f"{cpu_line()}; last-level cache {llc / 2**20:.0f} MiB; a decode token reads "
             f"{m.num_layers * k * pool.expert_bytes / 2**20:.0f} MiB of experts",
             f"- command: `.venv/bin/python bench/diagnostics/cold_loop_check.py {' '.join(sys.argv[1:])}`", "",
             "| layer timed | ms per layer, median of rounds | / real decode | rounds |", "|---|---|---|---|"]
    for name, values in ms.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med:.3f} | {med / real:.3f} | {', '.join(f'{v:.2f}' for v in values)} |")
    return emit(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
