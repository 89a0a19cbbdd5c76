"""`moeplan profile`: measure this host and write profiles/<hostname>.yaml (docs/profile.md)."""
from __future__ import annotations

import argparse
import logging
import re
import socket
import sys
import time
from pathlib import Path

from runtime.errors import UserError

log = logging.getLogger(__name__)

# Shapes measured without --model (hidden, expert intermediate, heads, KV heads, head dim, experts):
# the project's small benchmark shape, the tiny model models/tiny-moe/train.py trains by default, and
# Mixtral-8x7B from the catalog (planner/catalog.py, which cites its config.json).
# (name, hidden, expert intermediate, heads, KV heads, head dim, experts, top-k, vocabulary): as the
# checkpoints bench/predict_vs_measure.py and models/tiny-moe/train.py build write them in config.json.
DEFAULT_SHAPES = (("bench-1024", 1024, 3584, 16, 8, 64, 8, 2, 1024), ("tiny-moe", 256, 512, 8, 4, 32, 8, 2, 4096))
DEFAULT_CATALOG_MODELS = ("mixtral-8x7b",)
_SHAPE_SPEC = re.compile(r"^(\d+):(\d+):(\d+):(\d+):(\d+)(?::(\d+)(?::(\d+)(?::(\d+))?)?)?$")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile", help="measure this host (DRAM, CPU experts, dense layer, GPU copies) into a profile",
        description="Measure this host and write a hardware profile (YAML) that `tune` plans against.")
    p.add_argument("--model", metavar="NAME|DIR",
                   help="measure this model's expert and attention shape (catalog name or checkpoint folder); "
                        "default: a small benchmark shape, the tiny test model's, and Mixtral-8x7B's")
    p.add_argument("--out", metavar="FILE", help="where to write the profile (default: profiles/<hostname>.yaml)")
    p.add_argument("--name", help="the profile's name (default: this host's name)")
    p.add_argument("--quick", action="store_true",
                   help="fewer thread counts, token counts, contexts and repeats (under a minute on 2 cores)")
    p.add_argument("--accelerator", default="auto", metavar="cuda:N|none",
                   help="accelerator to measure (default: cuda:0 when CUDA is available, else none)")
    # For tests and quick experiments: not part of the documented interface.
    p.add_argument("--shape", action="append", default=None, metavar="H:I:HEADS:KV:HEAD_DIM[:EXPERTS[:TOP_K[:VOCAB]]]",
                   help=argparse.SUPPRESS)
    p.add_argument("--stream-mb", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--pool-mb", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokens", default=None, help=argparse.SUPPRESS)
    p.add_argument("--contexts", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    import dataclasses

    import torch
    from tqdm import tqdm

    from ..profile import Profile
    from ..profile.run import Settings, measure_profile

    host = socket.gethostname().split(".")[0] or "host"
    out = Path(args.out) if args.out else Path("profiles") / f"{host}.yaml"
    shapes = _shapes(args)
    settings = Settings.for_run(args.quick)
    overrides: dict[str, object] = {}
    if args.stream_mb is not None:
        overrides["stream_bytes"] = _positive(args.stream_mb, "--stream-mb") << 20
    if args.pool_mb is not None:
        overrides["pool_bytes"] = _positive(args.pool_mb, "--pool-mb") << 20
    for flag in ("threads", "tokens", "contexts"):
        if getattr(args, flag) is not None:
            overrides[flag] = _int_list(getattr(args, flag), f"--{flag}")
    if "tokens" in overrides:  # the MoE layer's multi-token paths at the same counts
        overrides["moe_tokens"] = overrides["tokens"]
    if "contexts" in overrides:
        overrides["prefill"] = min(overrides["contexts"])  # type: ignore[type-var]
    settings = dataclasses.replace(settings, **overrides)
    accelerator = _accelerator(args.accelerator, torch)

    log.info("profiling %s for %s%s -> %s", host, ", ".join(s.name for s in shapes),
             f" and {accelerator}" if accelerator is not None else " (no accelerator)", out)
    bar = None if args.no_progress else tqdm(total=1, file=sys.stderr, unit="step", dynamic_ncols=True)

    def progress(done: int, total: int, label: str) -> None:
        if bar is None:
            return
        bar.total = total
        bar.n = done
        bar.set_description_str(label[:60], refresh=False)
        bar.refresh()

    start = time.perf_counter()
    try:
        data = measure_profile(shapes, settings, name=args.name or host, progress=progress, accelerator=accelerator)
    finally:
        if bar is not None:
            bar.close()
    profile = Profile.from_dict(data, source=f"measured profile for {out}")  # validate what we measured
    profile.save(out)
    elapsed = time.perf_counter() - start
    cpu = profile.cpu
    top = max(cpu.memory_read_gbps)
    print(f"wrote {out} in {elapsed:.1f} s: DRAM read {cpu.memory_read_gbps[top]:.1f} GB/s at {top} threads"
          + (f", last-level cache {profile.llc_bytes / 2**20:.0f} MiB" if profile.llc_bytes else "")
          + (f", {profile.accelerator.name}" if profile.accelerator else ", no accelerator"), file=sys.stderr)
    return 0


def _shapes(args: argparse.Namespace) -> list:
    from ..profile.measure_dense import LayerShape

    if args.shape:
        shapes = []
        for spec in args.shape:
            m = _SHAPE_SPEC.match(spec)
            if not m:
                raise UserError(f"--shape: expected H:I:HEADS:KV:HEAD_DIM[:EXPERTS[:TOP_K[:VOCAB]]], got {spec!r}")
            h, i, heads, kv, hd = (int(x) for x in m.groups()[:5])
            experts = int(m.group(6) or 8)
            top_k = int(m.group(7) or min(2, experts))
            vocab = int(m.group(8) or 0)  # 0: no decode step timing
            if min(h, i, heads, kv, hd, experts, top_k) < 1 or heads % kv or top_k > experts:
                raise UserError(f"--shape: sizes must be positive, KV heads must divide heads and top-k must not "
                                f"exceed the experts, got {spec!r}")
            shapes.append(LayerShape(f"shape-{h}x{i}", h, i, heads, kv, hd, experts, top_k, vocab))
        return shapes
    from ..catalog import load_model_shape

    names = (args.model,) if args.model else DEFAULT_CATALOG_MODELS
    shapes = [] if args.model else [LayerShape(*spec) for spec in DEFAULT_SHAPES]
    for name in names:
        m = load_model_shape(name)
        shapes.append(LayerShape(m.name, m.hidden, m.expert_intermediate, m.num_heads, m.num_kv_heads, m.head_dim,
                                 m.num_experts, m.top_k, m.vocab))
    return shapes


def _accelerator(value: str, torch: object) -> object:
    t = torch  # torch module, passed in so that this module imports it only inside main
    if value == "none":
        return None
    if value == "auto":
        return t.device("cuda", 0) if t.cuda.is_available() else None  # type: ignore[attr-defined]
    m = re.fullmatch(r"cuda(?::(\d+))?", value)
    if not m:
        raise UserError(f"--accelerator: expected cuda:N, none or auto, got {value!r}")
    if not t.cuda.is_available():  # type: ignore[attr-defined]
        raise UserError(f"--accelerator: {value} asked for, but CUDA is not available on this host")
    index = int(m.group(1) or 0)
    if index >= t.cuda.device_count():  # type: ignore[attr-defined]
        raise UserError(f"--accelerator: {value} does not exist (this host has {t.cuda.device_count()} CUDA devices)")
    return t.device("cuda", index)  # type: ignore[attr-defined]


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise UserError(f"{flag}: must be >= 1, got {value}")
    return value


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag}: expected positive integers, got {text!r}")
    return values
