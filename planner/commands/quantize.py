"""`moeplan quantize SRC --experts int8|int4 [--group-size N] --out DST`: a checkpoint with quantized experts.

The work is runtime/quantize.py's (streaming, atomic, never overwriting); this module parses the command
line and reports.
"""
from __future__ import annotations

import argparse
import resource
import sys

from .arg_types import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    from runtime.contracts.expert_format import DEFAULT_GROUP_SIZE, INT_FORMATS

    p = sub.add_parser("quantize", help="write a checkpoint whose routed experts are int8 or int4",
                       description="Quantize SRC's routed experts (symmetric groups along each row's inputs, one "
                                   "float16 scale per group) into a new checkpoint folder DST that `run` loads as "
                                   "it is; everything else is copied unchanged. Streams tensor by tensor; DST "
                                   "appears only when complete, and is never overwritten.")
    p.add_argument("src", metavar="SRC", help="local Hugging Face checkpoint folder (safetensors)")
    p.add_argument("--experts", required=True, choices=INT_FORMATS, help="storage of the routed experts")
    p.add_argument("--group-size", type=positive_int, default=DEFAULT_GROUP_SIZE, metavar="N",
                   help=f"inputs per scale, a multiple of 8 that divides every expert matrix's input size "
                        f"(default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--out", required=True, metavar="DST", help="checkpoint folder to create (must not exist)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from runtime.quantize import quantize_checkpoint

    report = quantize_checkpoint(args.src, args.out, args.experts, args.group_size, progress=not args.no_progress)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(f"{args.out}: {report.matrices} expert matrices quantized to {args.experts} (group size "
          f"{args.group_size}); weights {report.src_bytes / 1e9:.3f} GB -> {report.dst_bytes / 1e9:.3f} GB in "
          f"{report.seconds:.1f} s; peak RSS {peak / 1e9:.2f} GB", file=sys.stderr)
    return 0
