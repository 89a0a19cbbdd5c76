"""Prefetch as the cost model predicts it against prefetch replayed exactly, on the embedded model's trace.

The trace (`traces/tiny-moe.jsonl`, recorded with `moeplan trace`) holds, for every pass and MoE layer,
the experts that the previous layer's hidden states guessed (what `lookahead: 1` prefetches). The
simulator replays those guesses exactly (it equals the runtime: tests/runtime/test_simulator_matches_runtime.py);
the cost model predicts prefetch statistically, each needed expert guessed with the accuracy measured on
the trace for its layer and its rank in the token's choice (`planner.routing.statistics.measure_guess_accuracy`,
what `tune` and `explain` use), the other guesses random. The last column is the model before it split the
accuracy by layer and rank (one accuracy for every needed expert), for comparison. For each cache size
and policy (promote on) the table gives the benefit of prefetch (lookahead 1 against 0) both ways: in
hits, in copies, and in the predicted decode tokens/s on the RTX 4070 profile.

    .venv/bin/python bench/prefetch_predict.py --out bench/results/prefetch_predict.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402
from planner.catalog import load_model_shape  # noqa: E402
from planner.cost_model import predict  # noqa: E402
from planner.profile import Profile  # noqa: E402
from planner.routing.simulator import simulate  # noqa: E402
from planner.routing.statistics import measure_guess_accuracy  # noqa: E402
from runtime.contracts.traces import load_trace  # noqa: E402
from runtime.plan import CacheSpec, HardwareSpec, MissSpec, ModelSpec, Plan, PrefetchSpec  # noqa: E402

PHASES = ("decode",)
SLOTS = (1, 2, 3, 4, 6)
POLICIES = ("lru", "adaptive")
SEEDS = range(5)  # the statistical replay's seeds: the cost model uses seed 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default="traces/tiny-moe.jsonl")
    parser.add_argument("--model", default="models/tiny-moe")
    parser.add_argument("--profile", default="profiles/rtx4070.yaml")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--out", default="bench/results/prefetch_predict.md")
    args = parser.parse_args()

    trace = load_trace(args.trace)
    shape = load_model_shape(args.model)
    profile = Profile.load(args.profile)
    L = trace.header.num_layers
    measured = measure_guess_accuracy(trace, PHASES)
    accuracy = measured.overall
    cells = "; ".join(f"layer {l}: " + ", ".join(f"{a:.2f}" for a in row)
                      for l, row in enumerate(measured.by_layer_rank) if row)
    rule = MissSpec(compute="cpu", transfer_min_tokens=0, promote=True)
    lines = ["# Prefetch: predicted (measured guess accuracy) against replayed exactly", "",
             f"Date {datetime.now(timezone.utc):%Y-%m-%d}. Pure-Python simulation and cost model: the numbers do "
             "not depend on the machine.", "", __doc__.split("\n\n")[1].replace("\n", " "), "",
             f"Trace `{Path(args.trace).name}`: {L} MoE layers, {trace.header.num_experts} experts, top-"
             f"{trace.header.top_k}, {len(trace.decode_passes())} decode passes (decode only here). Guess "
             f"accuracy measured on it: **{accuracy:.3f}** (needed experts of layers 1..{L - 1} that the previous "
             f"layer guessed); by layer and rank (top-1 first): {cells}. Profile `{Path(args.profile).name}`, context {args.context}.", "",
             "| slots/layer | policy | hits, no prefetch | benefit in hits: exact | predicted (seed 0) | "
             "predicted / exact | predicted, median of 5 seeds / exact | copies/pass: exact | predicted | "
             "decode tok/s gain: exact | predicted | predicted / exact | one accuracy for all: predicted, median "
             "of 5 seeds / exact |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ratios = []
    for slots in SLOTS:
        for policy in POLICIES:
            per_layer = [slots] * L
            base = simulate(trace, per_layer, policy, None, rule.rule, phases=PHASES)
            exact = simulate(trace, per_layer, policy, None, rule.rule, lookahead=1, phases=PHASES,
                             replay_guesses=True)
            stat = [simulate(trace, per_layer, policy, None, rule.rule, lookahead=1, prefetch_accuracy=measured,
                             phases=PHASES, seed=s) for s in SEEDS]
            flat = [simulate(trace, per_layer, policy, None, rule.rule, lookahead=1, prefetch_accuracy=accuracy,
                             phases=PHASES, seed=s).hits - base.hits for s in SEEDS]
            gain_exact = exact.hits - base.hits
            gain_pred = stat[0].hits - base.hits
            gain_median = statistics.median(s.hits - base.hits for s in stat)
            plan = Plan(model=ModelSpec(name=shape.name, dtype=shape.dtype),
                        hardware=HardwareSpec(accelerator="cuda:0", cpu_threads=profile.physical_cores),
                        cache=CacheSpec(slots=slots, policy=policy), miss=rule)
            fetch = replace(plan, prefetch=PrefetchSpec(lookahead=1))
            tps = {name: predict(profile, shape, p, sim, context=args.context, prompt_tokens=8).decode_tokens_per_s
                   for name, p, sim in (("base", plan, base), ("exact", fetch, exact), ("pred", fetch, stat[0]))}
            tok_exact, tok_pred = tps["exact"] - tps["base"], tps["pred"] - tps["base"]
            ratio = gain_pred / gain_exact if gain_exact else float("nan")
            ratios.append(ratio)
            lines.append(
                f"| {slots} | {policy} | {base.hit_rate:.1%} | {gain_exact:+d} | {gain_pred:+d} | {ratio:.2f} | "
                f"{gain_median / gain_exact if gain_exact else float('nan'):.2f} | {exact.decode.prefetches:.2f} | "
                f"{stat[0].decode.prefetches:.2f} | {tok_exact:+.2f} | {tok_pred:+.2f} | "
                f"{tok_pred / tok_exact if tok_exact else float('nan'):.2f} | "
                f"{statistics.median(flat) / gain_exact if gain_exact else float('nan'):.2f} |")
    within = sum(1 for r in ratios if abs(r - 1) <= 0.10)
    lines += ["", f"Benefit in hits predicted within 10 % of the exact replay: {within} of {len(ratios)} rows.", "",
              "Reproduce: `.venv/bin/python bench/prefetch_predict.py --out bench/results/prefetch_predict.md`"]
    return emit(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
