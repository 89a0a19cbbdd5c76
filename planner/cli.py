"""The `moeplan` command line: a thin dispatcher over one module per sub-command.

The library logs; this module configures logging, turns user errors into one line and exit code 1,
Ctrl-C into exit code 130, and leaves every other exception's traceback alone (those are bugs).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from runtime.errors import UserError
from runtime.huge_pages import request_for_new_tensors

# The sub-commands, in the order `moeplan --help` lists them.
COMMANDS = ("profile", "trace", "tune", "explain", "run", "serve", "quantize", "perplexity")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, object]]:
    parser = argparse.ArgumentParser(
        prog="moeplan",
        description="Plan and run Mixture-of-Experts models on machines whose GPU is too small for them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    modules = {}
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"planner.commands.{name}")
        except ModuleNotFoundError as exc:  # a command still being built in this checkout
            if exc.name != f"planner.commands.{name}":
                raise
            continue
        module.add_parser(sub)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    parser, modules = build_parser()
    args = parser.parse_args(argv)
    # before torch's first allocation: weights loaded from here on are born in 2 MB pages
    request_for_new_tensors(getattr(args, "huge_pages", None) is not False)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        return int(modules[args.command].main(args) or 0)
    except UserError as exc:
        print(f"moeplan {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"moeplan {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
