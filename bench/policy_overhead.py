"""What each cache policy's bookkeeping costs per MoE layer and decode token (pure Python, the runtime's own code).

Replays the recorded OLMoE decode trace through `route_pass` (the call the runtime makes for every MoE layer
of every pass), one `LayerCachePolicy` per layer, promote on, for each policy in turn; the policies take
turns within each repeat (alternating, so that a busy machine slows them alike) and the table gives the
median over repeats of microseconds per call, and its ratio to lru's in the same repeat.

    .venv/bin/python bench/policy_overhead.py --slots 6 16 --repeats 5 --out bench/results/policy_overhead.md
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import emit  # noqa: E402
from runtime.contracts.cache_policy import LayerCachePolicy, MissRule, route_pass  # noqa: E402
from runtime.contracts.traces import Trace, load_trace  # noqa: E402

POLICIES = ("lru", "lfu", "fifo", "adaptive", "markov")


def seconds_per_call(trace: Trace, slots: int, policy: str) -> float:
    L = trace.header.num_layers
    caches = [LayerCachePolicy(slots, policy) for _ in range(L)]
    rule = MissRule(promote=True)
    needs = [[trace.tokens_per_expert(i, l) for l in range(L)] for i in range(len(trace.passes))]
    start = time.perf_counter()
    for per_layer in needs:
        for cache, needed in zip(caches, per_layer):
            route_pass(cache, needed, rule)
    return (time.perf_counter() - start) / (len(needs) * L)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", default="traces/olmoe-1b-7b-decode-299.jsonl")
    parser.add_argument("--slots", type=int, nargs="+", default=[6, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/policy_overhead.md")
    args = parser.parse_args()

    trace = load_trace(args.trace)
    h = trace.header
    lines = ["# Cache policy bookkeeping per MoE layer and decode token", "",
             f"Date {datetime.now(timezone.utc):%Y-%m-%d}, {platform.machine()} ({platform.processor() or 'cpu'}), "
             f"Python {platform.python_version()}, one thread. {__doc__.split(chr(10) * 2)[1].replace(chr(10), ' ')}",
             "", f"Trace `{Path(args.trace).name}`: {h.num_layers} MoE layers, {h.num_experts} experts, top-{h.top_k}, "
             f"{len(trace.passes)} passes; {args.repeats} repeats.", "",
             "| slots/layer | " + " | ".join(f"{p} us/call" for p in POLICIES) + " | "
             + " | ".join(f"{p} / lru" for p in POLICIES[1:]) + " |",
             "|---|" + "---|" * (2 * len(POLICIES) - 1)]
    for slots in args.slots:
        runs: dict[str, list[float]] = {p: [] for p in POLICIES}
        for _ in range(args.repeats):
            for policy in POLICIES:
                runs[policy].append(seconds_per_call(trace, slots, policy))
        ratios = {p: statistics.median(a / b for a, b in zip(runs[p], runs["lru"])) for p in POLICIES[1:]}
        lines.append(f"| {slots} | " + " | ".join(f"{statistics.median(runs[p]) * 1e6:.1f}" for p in POLICIES) + " | "
                     + " | ".join(f"{ratios[p]:.2f}" for p in POLICIES[1:]) + " |")
    lines += ["", f"Reproduce: `.venv/bin/python bench/policy_overhead.py --slots {' '.join(map(str, args.slots))} "
              f"--repeats {args.repeats} --out {args.out}`"]
    return emit(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
