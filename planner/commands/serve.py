"""`moeplan serve PLAN`: load a plan once and answer OpenAI-compatible clients over HTTP (planner/serve/)."""
from __future__ import annotations

import argparse
import os

from .arg_types import positive_int

API_KEY_VARIABLE = "MOEPLAN_API_KEY"


def port_number(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in 0..65535, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model to OpenAI-compatible clients over HTTP",
                       description="Load PLAN and its checkpoint once, then answer /v1/completions, "
                                   "/v1/chat/completions and /v1/models (OpenAI's API), /health and /metrics. "
                                   "Requests run one at a time, in arrival order.")
    p.add_argument("plan", metavar="PLAN", help="execution plan (YAML), e.g. plans/tiny-moe.yaml")
    p.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint folder (overrides model.path)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_VARIABLE} if set, "
                        "else no key)")
    p.add_argument("--max-queue", type=non_negative_int, default=16, metavar="N",
                   help="requests that may wait behind the running one; more are answered 429 (default 16)")
    p.add_argument("--context", type=positive_int, metavar="N",
                   help="prompt plus new tokens per request (default: the checkpoint's max_position_embeddings); "
                        "the memory check sizes the KV cache for it")
    p.add_argument("--huge-pages", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU-resident weights in 2 MB pages, as for `moeplan run`")


def main(args: argparse.Namespace) -> int:
    import logging

    from planner.serve.binding import bind, is_loopback
    from runtime.errors import UserError
    from runtime.plan import Plan

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_VARIABLE) or None
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key: must not be empty or blank")
    # the quick checks first, before torch is imported: the plan file, then the port
    plan = Plan.load(args.plan)
    sock = bind(args.host, args.port)
    if api_key is None and not is_loopback(args.host):
        logging.getLogger("moeplan.serve").warning(
            "--host %s: the server is reachable from other machines without an API key (--api-key)", args.host)
    from planner.serve.server import serve

    serve(plan, args.model, sock, api_key, args.max_queue, args.context, args.huge_pages)
    return 0
