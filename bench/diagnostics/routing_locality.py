"""Why a synthetic trace fitted to a recorded trace's one-step statistics predicts a higher hit rate than the
recorded trace gives: locality beyond one token, measured on each recorded trace and on synthetic traces
calibrated to its statistics (planner/tune/routing_check.py draws them the same way), decode passes.

Per recorded trace, means over MoE layers:
- reuse at distance d = 1..8: share of a token's experts that the token d before also chose;
- recency: share of selections whose expert was last chosen d = 1..8 tokens before (last column: longer
  ago, or never);
- reuse by popularity quarter (statistics.py): the share of a quarter's selections that the next token
  chose again, most popular quarter first.

    .venv/bin/python bench/diagnostics/routing_locality.py --seeds 0 1
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from planner.catalog import load_model_shape  # noqa: E402
from planner.routing.calibrated import calibrate  # noqa: E402
from planner.routing.published import recorded_targets  # noqa: E402
from planner.routing.statistics import TraceStats, next_token_reuse, trace_stats  # noqa: E402
from runtime.contracts.traces import Trace, load_trace  # noqa: E402

RECORDED = (("models/tiny-moe", "traces/tiny-moe.jsonl"), ("olmoe-1b-7b", "traces/olmoe-1b-7b-decode-299.jsonl"))
DISTANCES = 8


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def recency(rows: list[tuple[int, ...]], longest: int) -> list[float]:
    last: dict[int, int] = {}
    hist = [0] * (longest + 1)
    for t, row in enumerate(rows):
        for e in row:
            d = t - last[e] if e in last else longest + 1
            hist[min(d, longest + 1) - 1] += 1
        for e in row:
            last[e] = t
    total = sum(hist)
    return [h / total for h in hist]


def describe(label: str, trace: Trace, stats: TraceStats | None = None) -> list[str]:
    """One table row; `stats`: the trace's decode statistics where the caller has them already."""
    k = trace.header.top_k
    rows = [trace.token_rows(l, ("decode",)) for l in range(trace.header.num_layers)]
    lag = [_mean([_mean(next_token_reuse(r, k, d)) for r in rows]) for d in range(1, DISTANCES + 1)]
    rec = [_mean(column) for column in zip(*(recency(r, DISTANCES) for r in rows))]
    stats = stats if stats is not None else trace_stats(trace, phases=("decode",))
    groups = [_mean([s.reuse_by_popularity[g] or 0.0 for s in stats.layers])
              for g in range(len(stats.layers[0].reuse_by_popularity))]
    return [f"| {label} | " + " ".join(f"{x:.3f}" for x in lag) + " | " + " ".join(f"{x:.3f}" for x in rec)
            + " | " + " ".join(f"{x:.3f}" for x in groups) + " |"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args()
    lines = [f"| trace | reuse at distance 1..{DISTANCES} | recency 1..{DISTANCES}, longer | reuse by popularity quarter |",
             "|---|---|---|---|"]
    for model, path in RECORDED:
        shape = load_model_shape(str(ROOT / model) if model.startswith("models/") else model)
        recorded = load_trace(ROOT / path, num_experts=shape.num_experts, top_k=shape.top_k, model=shape.name)
        stats = trace_stats(recorded, phases=("decode",))
        targets = recorded_targets(stats, Path(path).name)
        lines += describe(f"{shape.name} recorded", recorded, stats)
        for seed in args.seeds:
            cal = calibrate(targets, None, shape.num_experts, shape.top_k, len(recorded.decode_passes()), seed,
                            fitted_from=f"statistics of {Path(path).name}")
            lines += describe(f"{shape.name} synthetic, seed {seed}", cal.trace)
        print(f"{path}: done", file=sys.stderr)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
