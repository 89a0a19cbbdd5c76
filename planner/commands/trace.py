"""`moeplan trace`: record routing traces with the runtime, and summarize them.

    moeplan trace --model DIR --prompts FILE --out FILE [--max-new-tokens N]
    moeplan trace stats FILE [--json] [--num-experts E] [--top-k K] [--model-name NAME]
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .arg_types import positive_int

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="record routing traces, or summarize one (trace stats FILE)",
                       description="Record the expert routing of a model on a prompt file (all-CPU plan), "
                                   "or with `trace stats FILE` print a trace's routing statistics.")
    p.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint folder to record")
    p.add_argument("--prompts", metavar="FILE", help="text file, one prompt per non-empty line")
    p.add_argument("--out", metavar="FILE", help="trace file to write (JSON Lines)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                   help="tokens generated per prompt (default 64)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="bfloat16",
                   help="weights dtype for recording (default bfloat16)")
    p.add_argument("--threads", type=positive_int, default=1, metavar="N", help="CPU threads (default 1)")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    s = actions.add_parser("stats", help="routing statistics of a trace file",
                           description="Per MoE layer: popularity skew, next-token and cross-layer reuse, "
                                       "working-set size.")
    s.add_argument("file", metavar="FILE", help="trace (moeplan format or compact {tok, layers} format)")
    s.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    s.add_argument("--num-experts", type=positive_int, metavar="E",
                   help="experts per layer (compact format; default: largest id + 1)")
    s.add_argument("--top-k", type=positive_int, metavar="K", help="experts per token (compact format)")
    s.add_argument("--model-name", metavar="NAME", help="model name (compact format; default: file name)")
    s.add_argument("--phase", choices=("all", "prefill", "decode"), default="all",
                   help="which passes to count (default all)")
    s.add_argument("--window", type=positive_int, default=16, metavar="N",
                   help="tokens per working-set window (default 16)")


def main(args: argparse.Namespace) -> int:
    if getattr(args, "action", None) == "stats":
        return _stats(args)
    from runtime.errors import UserError

    missing = [flag for flag, value in (("--model", args.model), ("--prompts", args.prompts), ("--out", args.out))
               if not value]
    if missing:
        raise UserError(f"recording needs {', '.join(missing)} (or use `moeplan trace stats FILE`)")
    return _record(Path(args.model), Path(args.prompts), Path(args.out), args.max_new_tokens, args.dtype,
                   args.threads)


def _stats(args: argparse.Namespace) -> int:
    from ..routing.statistics import format_table, trace_stats
    from runtime.contracts.traces import PHASES, load_trace

    trace = load_trace(args.file, num_experts=args.num_experts, top_k=args.top_k, model=args.model_name)
    phases = PHASES if args.phase == "all" else (args.phase,)
    stats = trace_stats(trace, phases=phases, window=args.window)
    print(json.dumps(stats.to_dict()) if args.json else format_table(stats))
    return 0


def read_prompts(path: Path) -> list[str]:
    from runtime.errors import UserError

    from runtime.textfile import read_text

    try:
        text = read_text(path, UserError, "prompts file")
    except UserError as exc:
        raise UserError(f"--prompts {exc}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts (one per non-empty line)")
    return prompts


def _record(model_dir: Path, prompts_file: Path, out: Path, max_new_tokens: int, dtype: str, threads: int) -> int:
    """Run every prompt through the runtime with an all-CPU plan; write one trace with all their passes."""
    import tempfile
    from dataclasses import replace

    from runtime.contracts.traces import Trace, TracePass, load_trace, write_trace
    from runtime.plan import HardwareSpec, ModelSpec, Plan
    from runtime.session import Session

    prompts = read_prompts(prompts_file)
    # All-CPU default: no expert cache, every expert computed on CPU threads. Routing does not depend
    # on the cache configuration, so this records the same experts any plan would see.
    plan = Plan(model=ModelSpec(name=model_dir.name, path=str(model_dir), dtype=dtype),
                hardware=HardwareSpec(accelerator="cpu", cpu_threads=threads))
    session = Session.load(plan, model_dir)
    passes: list[TracePass] = []
    header = None
    with tempfile.TemporaryDirectory(prefix="moeplan-trace-") as tmp:
        for i, prompt in enumerate(prompts):
            part = Path(tmp) / f"prompt-{i}.jsonl"
            result = session.generate(prompt, max_new_tokens=max_new_tokens, trace_out=part)
            recorded = load_trace(part)
            header = header or recorded.header
            # Pass indices continue across prompts.
            base = len(passes)
            passes.extend([replace(p, index=base + j) for j, p in enumerate(recorded.passes)])
            log.info("prompt %d/%d: %d prompt tokens, %d generated, %d passes", i + 1, len(prompts),
                     result.prompt_tokens, len(result.generated_ids), len(recorded.passes))
    assert header is not None
    extra = {k: v for k, v in header.extra.items() if k != "prompt"}
    extra.update({"prompts_file": str(prompts_file), "prompts": len(prompts), "max_new_tokens": max_new_tokens})
    write_trace(out, Trace(replace(header, extra=extra), tuple(passes)))
    log.info("wrote %s: %d passes, %d MoE layers", out, len(passes), header.num_layers)
    return 0
