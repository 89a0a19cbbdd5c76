"""Routing calibration: synthetic traces against the statistics they were fitted to, and hit rates predicted
from a model's statistics alone against its recorded routing.

(a) For each catalog model with published routing statistics (Mixtral-8x7B: the Mixtral paper's Table 5;
    Mixtral-8x22B takes them at the same relative depth), the synthetic trace `tune` plans on (256 decode
    tokens, seed 0) measured by statistics.trace_stats beside the published figures, layer by layer.
(b) For each recorded trace the project has (OLMoE, the embedded tiny-moe): a plan tuned (real Optuna study)
    on a synthetic trace calibrated to the recorded trace's statistics alone, then replayed on the synthetic
    and on the recorded trace (planner/tune/routing_check.py); profile rtx4070, a memory budget holding
    each of `--expert-fractions` of all experts.

    .venv/bin/python bench/routing_calibration.py --out bench/results/routing_calibration.md
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from planner.catalog import load_model_shape  # noqa: E402
from planner.profile import Profile  # noqa: E402
from planner.routing.published import STATISTICS  # noqa: E402
from planner.routing.workload import calibrated_trace  # noqa: E402
from planner.tune.routing_check import relative, statistics_only_check  # noqa: E402
from runtime.atomic import write_atomic  # noqa: E402
from runtime.contracts.traces import load_trace  # noqa: E402

PUBLISHED_MODELS = ("mixtral-8x7b", "mixtral-8x22b")
RECORDED = (("models/tiny-moe", "traces/tiny-moe.jsonl"), ("olmoe-1b-7b", "traces/olmoe-1b-7b-decode-299.jsonl"))


def published_section(name: str) -> list[str]:
    shape = load_model_shape(name)
    cal, _, source = calibrated_trace(shape, ROOT / "traces", seed=0)
    t = cal.targets
    lines = [f"### {name} ({t.status})", "", f"Trace: {source}.", ""]
    lines += [f"- {k}: {v}" for k, v in t.sources.items()]
    lines += ["", "| layer | published? | " + " | ".join(f"{s} target / synthetic / off" for s in STATISTICS) + " |",
              "|---|---|" + "---|" * len(STATISTICS)]
    by = {(c.statistic, c.layer): c for c in cal.checks}
    for l, target in enumerate(t.layers):
        cells = []
        for s in STATISTICS:
            c = by.get((s, l))
            cells.append("-" if c is None else f"{c.target:.3f} / {c.synthetic:.3f} / {100 * c.relative_error:.1f}%")
        mark = "published" if l in t.published_layers else ("interpolated" if target.interpolated else "family")
        lines.append(f"| {l} | {mark} | " + " | ".join(cells) + " |")
    lines.append("")
    for s in STATISTICS:
        w = cal.worst(s)
        if w is not None:
            lines.append(f"- {s}: worst layer {w.layer}, {100 * w.relative_error:.1f}% off; mean "
                         f"{100 * cal.mean_error(s):.1f}% off")
    return lines + [""]


def recorded_section(model: str, trace_path: str, profile: Profile, fraction: float, trials: int) -> list[str]:
    shape = load_model_shape(str(ROOT / model) if model.startswith("models/") else model)
    recorded = load_trace(ROOT / trace_path, num_experts=shape.num_experts, top_k=shape.top_k, model=shape.name)
    start = time.perf_counter()
    c = statistics_only_check(shape, recorded, Path(trace_path).name, profile, expert_fraction=fraction,
                              trials=trials)
    lines = [f"### {shape.name}: `{trace_path}`, budget {fraction:.0%} of the experts", "",
             f"Statistics used (measured on the trace, decode passes): {c.calibration.summary()}.", "",
             f"Study on the synthetic trace: {trials} trials, seed 0, {time.perf_counter() - start:.0f} s.", "",
             "| plan | slots | policy | miss | hit rate over | from statistics alone (mean over 3 synthetic draws) "
             "| recorded | relative difference |", "|---|---|---|---|---|---|---|---|"]
    rows = [("tuned (the study's choice)", c.tuned)]
    if c.caching is None:
        note = "No trial of the study had a cache that fills as it runs and hits, so there is no caching plan to check."
    elif c.caching is c.tuned:
        note = "The tuned plan is also the study's fastest caching plan (planner/tune/routing_check.py)."
    else:
        rows.append(("fastest caching plan of the study", c.caching))
        note = ("The tuned plan has no cache that fills as it runs and hits; the second plan is the study's fastest "
                "that has (slots that misses enter, hits on the synthetic trace), so that the statistics' prediction "
                "of hits is checked where there are hits (planner/tune/routing_check.py).")
    for label, h in rows:
        p = h.plan
        plan = (f"| {label} | {sum(p.cache.slots)} | {p.cache.policy} | {p.miss.compute}, promote {p.miss.promote}, "
                f"transfer_min_tokens {p.miss.transfer_min_tokens}, lookahead {p.prefetch.lookahead}")
        lines.append(f"{plan} | decode passes | {h.synthetic_decode_hit_rate:.4f} | {h.recorded_decode_hit_rate:.4f} | "
                     f"{100 * h.decode_relative_error:.1f}% |")
        lines.append(f"{plan} | all passes | {h.synthetic_hit_rate:.4f} | {h.recorded_hit_rate:.4f} | "
                     f"{100 * relative(h.synthetic_hit_rate, h.recorded_hit_rate):.1f}% |")
    return lines + ["", note, ""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench/results/routing_calibration.md"))
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--expert-fractions", type=float, nargs="+", default=[0.25, 0.5],
                    help="memory budgets, as fractions of all experts, to tune each recorded check at")
    ap.add_argument("--profile", default=str(ROOT / "profiles/rtx4070.yaml"))
    args = ap.parse_args()
    profile = Profile.load(args.profile)
    lines = ["# Routing calibration", "",
             f"Date {datetime.now(timezone.utc):%Y-%m-%d}, {platform.machine()}, Python {platform.python_version()} "
             f"(pure-Python sampling and simulation: the numbers do not depend on the machine; the machine was "
             f"shared, so the times are noisy).", "",
             "## (a) Synthetic traces against published statistics, layer by layer", ""]
    for name in PUBLISHED_MODELS:
        lines += published_section(name)
        print(f"{name}: done", file=sys.stderr)
    lines += ["## (b) Hit rate from a model's statistics alone against its recorded routing", "",
              f"Profile `{Path(args.profile).name}`, memory budgets for "
              f"{', '.join(f'{f:.0%}' for f in args.expert_fractions)} of the experts. "
              "The synthetic trace keeps only the recorded trace's per-layer skew, popularity shape, next-token "
              "reuse, reuse by popularity quarter, second-token reuse and (where the trace keeps rank order) "
              "first-choice and first-or-second repetition (docs/traces.md); its expert ids are a "
              "random labelling, so the tuner offers no static set on it and predicts a preload with arbitrary ids.", ""]
    for model, trace in RECORDED:
        for fraction in args.expert_fractions:
            lines += recorded_section(model, trace, profile, fraction, args.trials)
            print(f"{trace} at {fraction}: done", file=sys.stderr)
            write_atomic(Path(args.out), "\n".join(lines + ["(partial: still running)", ""]))
    lines += [f"Reproduce: `.venv/bin/python bench/routing_calibration.py --trials {args.trials} "
              f"--expert-fractions {' '.join(map(str, args.expert_fractions))}`", ""]
    write_atomic(Path(args.out), "\n".join(lines))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
