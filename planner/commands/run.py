"""`moeplan run PLAN`: load a plan and its checkpoint, generate, and report tokens/s and the cache's work."""
from __future__ import annotations

import argparse
import json
import resource
import sys

from .arg_types import non_negative_float, positive_int, probability

DEFAULT_PROMPT = "def fibonacci(n):"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a model with an execution plan",
                       description="Load PLAN and its checkpoint, generate text, report tokens/s and cache hits.")
    p.add_argument("plan", metavar="PLAN", help="execution plan (YAML), e.g. plans/rtx4070.yaml")
    p.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint folder (overrides model.path)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"prompt text (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N", help="default 64")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, metavar="T",
                   help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=probability, default=1.0, metavar="P", help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout when done")
    p.add_argument("--trace-out", metavar="FILE", help="write every forward pass's routing to FILE (JSON Lines)")
    p.add_argument("--replay-trace", metavar="FILE",
                   help="force each layer's experts from a recorded trace (benchmarks on random weights)")
    p.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU-resident weights in 2 MB pages (Linux), faster CPU decode. Default: the weights are "
                        "allocated in them and the small rest is copied; --huge-pages also copies whatever was "
                        "not (about 1 s per GB), --no-huge-pages keeps 4 KB pages")


def main(args: argparse.Namespace) -> int:
    from runtime.atomic import check_writable
    from runtime.plan import Plan
    from runtime.session import Session

    plan = Plan.load(args.plan)
    if args.trace_out:
        check_writable(args.trace_out, "--trace-out")
    # prompt characters bound its token count from above: enough to size the KV cache in the memory check
    session = Session.load(plan, args.model, replay_trace=args.replay_trace,
                           context_tokens=len(args.prompt.encode()) + args.max_new_tokens + 2,
                           huge_pages=args.huge_pages)
    on_text = None if args.json else _print_now
    result = session.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, on_text=on_text, trace_out=args.trace_out)
    report = result.as_dict()
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if plan.predicted:
        report["predicted"] = plan.predicted
    if args.json:
        print(json.dumps(report))
    else:
        print()
        cache = report["cache"]
        print(f"{len(result.generated_ids)} tokens | prefill {result.prompt_tokens} tokens in "
              f"{result.prefill_seconds:.2f} s | decode {result.decode_tokens_per_s:.2f} tokens/s | "
              f"hit rate {cache['hit_rate']:.1%} ({cache['hits']} hits, {cache['misses']} misses)",
              file=sys.stderr)
        if plan.predicted:
            pred = plan.predicted
            print(f"plan predicted: decode {pred.get('decode_tokens_per_s', float('nan')):.2f} tokens/s, "
                  f"hit rate {pred.get('hit_rate', float('nan')):.1%}", file=sys.stderr)
    return 0


def _print_now(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
