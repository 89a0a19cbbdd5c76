"""Simulated expert-cache hit rates on the recorded OLMoE decode trace, per policy and cache size.

Decode passes, promote on (every CPU miss is copied into the cache), caches start empty except
static, which keeps the experts the trace itself uses most (in-sample: an optimistic static).
Belady is the offline optimum among caches where every miss enters.

    .venv/bin/python bench/simulate_olmoe.py \
        --trace traces/olmoe-1b-7b-decode-299.jsonl --out bench/results/simulate_olmoe.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner.routing.simulator import belady, lru_hit_curves, popular_preload, simulate  # noqa: E402
from runtime.contracts.traces import load_trace  # noqa: E402
from runtime.atomic import write_atomic  # noqa: E402
from runtime.contracts.cache_policy import MissRule  # noqa: E402

FRACTIONS = (0.10, 0.25, 0.50)
PHASES = ("decode",)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default="traces/olmoe-1b-7b-decode-299.jsonl")
    parser.add_argument("--out", default="bench/results/simulate_olmoe.md")
    args = parser.parse_args()

    trace = load_trace(args.trace)
    L, E = trace.header.num_layers, trace.header.num_experts
    rule = MissRule(promote=True)
    needed = sum(len(trace.tokens_per_expert(i, l)) for i, p in enumerate(trace.passes) if p.phase in PHASES
                 for l in range(L))
    curves = lru_hit_curves(trace, phases=PHASES)
    rows = []
    start = time.perf_counter()
    for fraction in FRACTIONS:
        slots = round(fraction * E)
        per_layer = [slots] * L
        rates = {}
        for policy in ("lru", "lfu", "fifo"):
            rates[policy] = simulate(trace, per_layer, policy, None, rule, phases=PHASES).hit_rate
        preload = popular_preload(trace, per_layer, phases=PHASES)
        rates["static"] = simulate(trace, per_layer, "static", preload, rule, phases=PHASES).hit_rate
        rates["belady"] = sum(belady(trace, per_layer, phases=PHASES)) / needed
        curve_rate = sum(c[slots] for c in curves) / needed
        assert abs(curve_rate - rates["lru"]) < 1e-12, "lru_hit_curves disagrees with simulate"
        rows.append((fraction, slots, rates))
    seconds = time.perf_counter() - start

    lines = [
        "# Simulated cache hit rates on the OLMoE decode trace",
        "",
        f"Trace: `{Path(args.trace).name}` ({L} MoE layers, {E} experts, top-{trace.header.top_k}, "
        f"{len(trace.decode_passes())} decode passes; {needed} needed experts counted).",
        "Decode passes, `miss: {compute: cpu, promote: true}`, caches empty at the start except static, whose",
        "preload is the experts this same trace needs most (`popular_preload`, in-sample). Belady: offline",
        "optimum among caches where every miss enters (`planner.routing.simulator.belady`).",
        "",
        "| cached | slots/layer | lru | lfu | fifo | static (popular preload) | Belady bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for fraction, slots, r in rows:
        lines.append(f"| {fraction:.0%} | {slots} | {r['lru']:.1%} | {r['lfu']:.1%} | {r['fifo']:.1%} | "
                     f"{r['static']:.1%} | {r['belady']:.1%} |")
    lines += ["",
              "With fewer slots than top-k (6 < 8), every decode pass needs more experts than a layer holds:",
              "each miss evicts and the cache ends every pass holding the last experts to enter, whatever the",
              "policy, so lru, lfu and fifo coincide there. Belady is a bound for the admitting policies",
              "(lru, lfu, fifo with promotion), not in general for static, which starts warm and never admits.",
              "", f"lru also checked against `lru_hit_curves` (equal). Simulation time for the table: "
              f"{seconds:.2f} s.", "",
              "Reproduce: `.venv/bin/python bench/simulate_olmoe.py --trace "
              "traces/olmoe-1b-7b-decode-299.jsonl --out bench/results/simulate_olmoe.md`", ""]
    text = "\n".join(lines)
    write_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
