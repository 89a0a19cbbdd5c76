"""Simulated expert-cache hit rates per policy and cache size, against the offline optimum.

Honest evaluation: every trace is replayed whole, but hits are counted on the second half of its decode
passes only; the first half warms the caches, and anything fitted to a trace (the static policy's preload)
is fitted on the first half alone. Decode passes, `miss: {compute: cpu, promote: true}` (every CPU miss is
offered to the cache), caches empty at the start except static's preload. markov's constants (those of its
nearest-neighbour term and its frequency weight) were picked on the first half of the OLMoE trace alone, by
the hits at 6 and 16 slots per layer summed (runtime/contracts/markov_scores.py). Rates to two decimals and
ratios to three, so that a ratio near a goal is not rounded onto it.

Traces: the recorded OLMoE decode trace, and synthetic traces of the same shape from the generator the
tuner uses when a model has no recorded trace (fitted to the first half of the OLMoE trace).
Two bounds: Belady among caches where every miss enters (what lru, lfu, fifo and adaptive are), and
Belady with bypass (a miss may also stay out: the offline optimum of any cache, and the bound for markov,
which declines a miss that scores below its victim).

    .venv/bin/python bench/simulate_olmoe.py --out bench/results/simulate_olmoe.md
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402
from planner.routing.simulator import belady, popular_preload, simulate  # noqa: E402
from planner.routing.synthetic import fit_routing_stats, synthesize  # noqa: E402
from runtime.contracts.cache_policy import MissRule  # noqa: E402
from runtime.contracts.traces import Trace, load_trace  # noqa: E402

FRACTIONS = (0.10, 0.25, 0.50)
PHASES = ("decode",)
ONLINE = ("lru", "lfu", "fifo", "adaptive", "markov")
SYNTHETIC_SEEDS = (0, 1)


def first_half(trace: Trace) -> Trace:
    decode = [p for p in trace.passes if p.phase in PHASES]
    return Trace(trace.header, tuple(decode[:len(decode) // 2]))


def rates(trace: Trace, fraction: float) -> dict[str, float]:
    """Second-half hit rates of every policy and both bounds at one cache size."""
    L, E = trace.header.num_layers, trace.header.num_experts
    half = len([p for p in trace.passes if p.phase in PHASES]) // 2
    slots = [round(fraction * E)] * L
    rule = MissRule(promote=True)
    out = {p: simulate(trace, slots, p, None, rule, phases=PHASES, count_from=half).hit_rate for p in ONLINE}
    preload = popular_preload(trace, slots, phases=PHASES, upto=half)
    out["static"] = simulate(trace, slots, "static", preload, rule, phases=PHASES, count_from=half).hit_rate
    counted = simulate(trace, [0] * L, "lru", None, rule, phases=PHASES, count_from=half).misses
    out["belady"] = sum(belady(trace, slots, phases=PHASES, count_from=half)) / counted
    out["bypass"] = sum(belady(trace, slots, phases=PHASES, bypass=True, count_from=half)) / counted
    return out


def table(title: str, trace: Trace, start: float) -> tuple[list[str], list[tuple[float, dict[str, float]]]]:
    lines = [f"### {title}", "",
             "| cached | slots/layer | lru | lfu | fifo | adaptive | markov | static (preload fitted on 1st half) "
             "| Belady | Belady with bypass | best online / Belady | best online / Belady with bypass |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for fraction in FRACTIONS:
        r = rates(trace, fraction)
        best = max(ONLINE, key=lambda p: r[p])
        lines.append(f"| {fraction:.0%} | {round(fraction * trace.header.num_experts)} | "
                     + " | ".join(f"{r[p]:.2%}" for p in (*ONLINE, "static", "belady", "bypass"))
                     + f" | {r[best] / r['belady']:.3f} ({best}) | {r[best] / r['bypass']:.3f} |")
        rows.append((fraction, r))
    lines += ["", f"({time.perf_counter() - start:.1f} s so far)", ""]
    return lines, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default="traces/olmoe-1b-7b-decode-299.jsonl")
    parser.add_argument("--out", default="bench/results/simulate_olmoe.md")
    args = parser.parse_args()

    start = time.perf_counter()
    trace = load_trace(args.trace)
    h = trace.header
    decode = len(trace.decode_passes())
    lines = ["# Simulated cache hit rates against the offline optimum", "",
             f"Date {datetime.now(timezone.utc):%Y-%m-%d}, {platform.machine()}, Python {platform.python_version()} "
             "(pure-Python simulation: the numbers do not depend on the machine).", "",
             __doc__.split("\n\n")[1].replace("\n", " "), "",
             __doc__.split("\n\n")[2].replace("\n", " "), ""]
    body, olmoe_rows = table(f"Recorded OLMoE trace `{Path(args.trace).name}` ({h.num_layers} MoE layers, "
                             f"{h.num_experts} experts, top-{h.top_k}, {decode} decode passes; hits counted on "
                             f"the last {decode - decode // 2})", trace, start)
    lines += body
    stats = fit_routing_stats(first_half(trace))
    for seed in SYNTHETIC_SEEDS:
        synthetic = synthesize(stats, h.num_layers, h.num_experts, h.top_k, tokens=decode, seed=seed)
        body, _ = table(f"Synthetic trace, seed {seed} (same shape and length, fitted to the OLMoE trace's "
                        "first half)", synthetic, start)
        lines += body
    lines += ["Reproduce: `.venv/bin/python bench/simulate_olmoe.py --out bench/results/simulate_olmoe.md`"]
    return emit(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
