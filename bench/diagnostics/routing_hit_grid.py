"""Hit rate from a model's statistics alone against its recorded routing, for a fixed grid of plans rather
than the one plan a short study picks (bench/routing_calibration.py): the tuned plan can be degenerate (no
slots at all, where the cost model finds CPU misses as fast), and one plan says little about the rest.

Per recorded trace and memory budget (a fraction of all experts, profile rtx4070): the synthetic traces of
planner/tune/routing_check.py (the recorded trace's statistics alone; 3 draws), and per plan of the grid
(the whole budget, misses on CPU, transfer_min_tokens 32; policy x promote x lookahead, prefetch replayed at
accuracy 0 on both traces as routing_check.py replays it) the slots split
across layers as the tuner splits them on the synthetic trace; the decode hit rate on the synthetic draws
(mean) against the recorded trace's.

    .venv/bin/python bench/diagnostics/routing_hit_grid.py --expert-fractions 0.25 0.5
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from planner.catalog import load_model_shape  # noqa: E402
from planner.profile import Profile  # noqa: E402
from planner.routing.calibrated import calibrate  # noqa: E402
from planner.routing.published import recorded_targets  # noqa: E402
from planner.routing.statistics import trace_stats  # noqa: E402
from planner.routing.workload import replay  # noqa: E402
from planner.tune.evaluation import Evaluator, cache_capacity  # noqa: E402
from planner.tune.routing_check import _workload, decode_hit_rate, relative  # noqa: E402
from planner.tune.space import Choice  # noqa: E402
from runtime.contracts.traces import load_trace  # noqa: E402

RECORDED = (("models/tiny-moe", "traces/tiny-moe.jsonl"), ("olmoe-1b-7b", "traces/olmoe-1b-7b-decode-299.jsonl"))
GRID = (("lru", True), ("fifo", False), ("adaptive", True), ("adaptive", False), ("markov", True))
DRAWS, CONTEXT, PROMPT = 3, 512, 128


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--expert-fractions", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--profile", default=str(ROOT / "profiles/rtx4070.yaml"))
    ap.add_argument("--lookahead", type=int, nargs="+", default=[0], help="prefetch lookahead of the plans (0, 1)")
    ap.add_argument("--only", default=None, help="only the recorded traces whose file name contains this")
    args = ap.parse_args()
    profile = Profile.load(args.profile)
    print("| trace | budget | plan | slots | synthetic (mean of 3) | recorded | relative difference |")
    print("|---|---|---|---|---|---|---|")
    for model, path in RECORDED:
        if args.only and args.only not in path:
            continue
        shape = load_model_shape(str(ROOT / model) if model.startswith("models/") else model)
        E, k = shape.num_experts, shape.top_k
        recorded = load_trace(ROOT / path, num_experts=E, top_k=k, model=shape.name)
        targets = recorded_targets(trace_stats(recorded, phases=("decode",)), Path(path).name)
        n = len(recorded.decode_passes())
        synthetic = [_workload(recorded, calibrate(targets, None, E, k, n, seed, fitted_from="grid").trace, PROMPT,
                               seed)[0] for seed in range(DRAWS)]
        recorded_full = _workload(recorded, synthetic[0], PROMPT, 0)[1]
        for fraction in args.expert_fractions:
            fixed = cache_capacity(profile, shape, "cuda:0", CONTEXT, PROMPT, None).fixed_bytes
            budget = fixed + round(fraction * shape.num_moe_layers * E) * shape.expert_bytes
            capacity = cache_capacity(profile, shape, "cuda:0", CONTEXT, PROMPT, budget)
            ev = Evaluator(profile, shape, synthetic[0], accelerator="cuda:0", context=CONTEXT, prompt_tokens=PROMPT,
                           capacity=capacity, vram_budget=budget)
            for (policy, promote), lookahead in ((g, a) for g in GRID for a in args.lookahead):
                choice = Choice(capacity.max_slots, policy, False, 1, "cpu", 32, promote, lookahead)
                plan = ev.plan(choice, ev.allocation(choice).slots)
                syn = sum(decode_hit_rate(replay(t, plan, shape, 0.0)) for t in synthetic) / DRAWS
                rec = decode_hit_rate(replay(recorded_full, plan, shape, 0.0))
                print(f"| {Path(path).name} | {fraction:.0%} | {policy}, promote {promote}, lookahead {lookahead} | {sum(plan.cache.slots)} | "
                      f"{syn:.4f} | {rec:.4f} | {100 * relative(syn, rec):.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
