"""The command-line arguments the decode benchmarks of the benchmark model share, with one set of defaults."""
from __future__ import annotations

import argparse
from pathlib import Path

from predict_vs_measure import PROMPT  # the benchmark model's prompt, as every decode benchmark runs it

ROOT = Path(__file__).resolve().parent.parent


def add_decode_args(ap: argparse.ArgumentParser, *, repeats: int = 5, repeats_flag: str = "--repeats") -> None:
    """--model (the Mixtral-shaped benchmark checkpoint, built when missing), --dtype, --threads, --tokens,
    the repeat count under `repeats_flag`, and --prompt."""
    ap.add_argument("--model", default=str(ROOT / "bench/models/mixtral-bench"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument(repeats_flag, type=int, default=repeats)
    ap.add_argument("--prompt", default=PROMPT)
