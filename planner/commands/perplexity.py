"""`moeplan perplexity PLAN --text FILE`: the model's perplexity under a plan, as llama-perplexity reports it.

How a user checks what an expert format costs: the same text under a bf16 plan and an int4 plan. The work is
the runtime's (runtime/perplexity.py: llama.cpp's windows, through the plan's loaded model).
"""
from __future__ import annotations

import argparse
import json

from .arg_types import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a model under a plan on a text file",
                       description="Perplexity of the model, run as PLAN says (its expert format, cache and "
                                   "kernels), on a text file: the text is cut into windows of --context tokens "
                                   "and the second half of each window is scored, as llama.cpp's "
                                   "llama-perplexity does.")
    p.add_argument("plan", metavar="PLAN", help="execution plan (YAML)")
    p.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint folder (overrides model.path)")
    p.add_argument("--text", metavar="FILE", required=True, help="UTF-8 text file to score")
    p.add_argument("--context", type=positive_int, metavar="N",
                   help="window length in tokens (default: 512, as llama-perplexity, or the model's context "
                        "where it is shorter)")
    p.add_argument("--max-tokens", type=positive_int, metavar="N",
                   help="score only the text's first N tokens (whole windows of them)")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object on stdout: {"perplexity": P, "tokens": N, "nll": ...}')


def main(args: argparse.Namespace) -> int:
    from runtime.errors import PlanError
    from runtime.perplexity import (PerplexityError, default_context, load_tokenizer, model_context, prepare,
                                    session_perplexity)
    from runtime.plan import Plan
    from runtime.session import Session
    from runtime.textfile import read_text

    plan = Plan.load(args.plan)
    text = read_text(args.text, PerplexityError, "text file")
    folder = args.model if args.model is not None else plan.model.path
    if not folder:
        raise PlanError("model.path: the plan names no model folder; give one with --model DIR")
    max_context = model_context(folder)
    context = args.context if args.context is not None else default_context(max_context)
    # the text and the context are checked before any weight is read
    ids, windows = prepare(load_tokenizer(folder), text, context, max_context, args.max_tokens, source=args.text)
    session = Session.load(plan, folder, context_tokens=context)
    result = session_perplexity(session, ids, windows)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"perplexity {result.perplexity:.4f} +/- {result.perplexity_error:.4f} (mean nll {result.nll:.5f}) "
              f"over {result.tokens} tokens: {result.chunks} windows of {result.context}, second halves scored")
    return 0
