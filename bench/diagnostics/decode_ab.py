"""One CPU decode-path piece on and off, side by side in one process: decode ms per token with each.

On a shared VM whose speed drifts by 10-20 % between runs, two processes measured minutes apart cannot
show a 5 % change; generations in one process that alternate the piece on and off (in alternating order)
can. Loads the benchmark checkpoint with the all-CPU plan, then for --pairs rounds generates --tokens
tokens with the piece on and with it off, and reports the medians, their ratio, and whether both gave
the same tokens.

    .venv/bin/python bench/diagnostics/decode_ab.py --piece runtime --base HEAD~1 --out bench/results/decode_ab_runtime_avx2.md

Pieces (the C router and the grouped q/k/v projections it once compared are gone: within noise, in git
history before 2026-12-07): `kernel` (the GEMV kernel built from this working tree, against the one of `--base`, a git revision: both
libraries are loaded and the live kernel's entry points are pointed at one or the other), `runtime` (the
whole runtime package of this working tree against `--base`'s, imported under another name: two sessions
of the same checkpoint in one process, generating in turn; for changes to the Python around the kernels).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from e2e_cpu import PLAN_V2  # noqa: E402  the same all-CPU plan as the end-to-end benchmark
from predict_vs_measure import build_model  # noqa: E402
from decode_args import add_decode_args  # noqa: E402
from report import cpu_line, emit  # noqa: E402
from runtime.huge_pages import request_for_new_tensors  # noqa: E402
from runtime.kernels import ISA_AVX2, ISA_AVX2_VNNI, GemvKernel, load  # noqa: E402
from runtime.plan import Plan  # noqa: E402
from runtime.session import Session  # noqa: E402


def revision_runtime(revision: str, name: str) -> Path:
    """The `runtime/` package of a git revision, extracted into a new folder under the given name."""
    folder = Path(tempfile.mkdtemp())
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "runtime"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return (folder / "runtime").rename(folder / name)


def base_kernel(revision: str) -> GemvKernel:
    """The GEMV kernel of a git revision, compiled as runtime/kernels compiles its own."""
    build = revision_runtime(revision, "runtime") / "kernels"
    compiler = shutil.which(os.environ.get("CC", "cc")) or "gcc"
    sources = sorted(str(path) for path in build.glob("*.c"))  # every C file of the revision's runtime
    subprocess.run([compiler, "-O3", "-fopenmp", "-shared", "-fPIC", *sources, "-o", str(build / "base.so"), "-lm"],
                   check=True)
    lib, live = ctypes.CDLL(str(build / "base.so")), load()
    # the int kernels' build as the live kernel picks it (a revision before the VNNI build has none)
    int_isa = ISA_AVX2 if live.int_isa == ISA_AVX2_VNNI and not hasattr(lib, "qgemv_multi_vnni") else live.int_isa
    return GemvKernel(lib, live.isa, int_isa)


def base_runtime(revision: str) -> str:
    """The `runtime/` package of a git revision, importable as `runtime_base`; returns that name."""
    sys.path.insert(0, str(revision_runtime(revision, "runtime_base").parent))
    return "runtime_base"


def base_session(revision: str, plan: Path, model: Path, huge_pages: bool) -> tuple[object, object]:
    """A session loaded by the base revision's runtime, and that runtime's attention function (transformers
    keeps one function per registered name, so the turn to each session registers its own)."""
    package = base_runtime(revision)
    modules = {name: __import__(f"{package}.{name}", fromlist=["_"])
               for name in ("session", "plan", "huge_pages", "decode_attention")}
    modules["huge_pages"].request_for_new_tensors(huge_pages)
    session = modules["session"].Session.load(modules["plan"].Plan.load(plan), model_dir=model,
                                              huge_pages=None if huge_pages else False)
    return session, modules["decode_attention"].cpu_decode_attention


def switch(session: Session, piece: str, base: str, plan: Path | None = None, model: Path | None = None,
           huge_pages: bool = True):
    """A function that turns the piece on (True) or off (False) and returns the session to generate with."""
    if piece == "runtime":
        from transformers import AttentionInterface

        from runtime.decode_attention import NAME, cpu_decode_attention

        other, other_attention = base_session(base, plan, model, huge_pages)

        def set_runtime(on: bool):
            AttentionInterface.register(NAME, cpu_decode_attention if on else other_attention)
            return session if on else other
        return set_runtime
    turn = _switch_piece(session, piece, base)

    def set_piece(on: bool) -> Session:
        turn(on)
        return session
    return set_piece


def _switch_piece(session: Session, piece: str, base: str):
    if piece == "kernel":
        live = load()  # the one instance every projection and the executor call
        if live is None:
            raise SystemExit("the CPU kernel is not available here")
        # the float kernels' entry points and the int kernels' (with the scratch size their inputs take)
        entry_points = ("_fn", "_one", "_token", "_qmulti", "_qtoken", "_qrow_floats")
        versions = {True: {name: getattr(live, name) for name in entry_points},
                    False: {name: getattr(base_kernel(base), name) for name in entry_points}}

        def set_kernel(on: bool) -> None:
            for name, fn in versions[on].items():
                setattr(live, name, fn)
        return set_kernel
    raise SystemExit(f"unknown piece {piece!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--piece", choices=["kernel", "runtime"], required=True)
    ap.add_argument("--base", default="725d231",
                    help="--piece kernel or runtime: the git revision whose kernel or runtime is 'off'")
    add_decode_args(ap, repeats=8, repeats_flag="--pairs")
    ap.add_argument("--no-huge-pages", action="store_true", help="load as `moeplan run --no-huge-pages` does")
    ap.add_argument("--experts", default="bfloat16", help="the plan's expert format: bfloat16, int8 or int4")
    ap.add_argument("--out")
    args = ap.parse_args()
    request_for_new_tensors(not args.no_huge_pages)  # as the command line does, before torch allocates
    model = Path(args.model)
    if not (model / "config.json").exists():
        build_model(model)
    plan = Path(tempfile.mkdtemp()) / "all-cpu.yaml"
    plan.write_text(PLAN_V2.format(dtype=args.dtype, experts=args.experts, threads=args.threads))
    session = Session.load(Plan.load(plan), model_dir=model, huge_pages=False if args.no_huge_pages else None)
    turn = switch(session, args.piece, args.base, plan, model, not args.no_huge_pages)
    for on in (True, False):  # warm-up
        turn(on).generate(args.prompt, max_new_tokens=4)
    ms: dict[bool, list[float]] = {True: [], False: []}
    tokens: dict[bool, list[int]] = {}
    for pair in range(args.pairs):
        for on in ((True, False) if pair % 2 == 0 else (False, True)):
            result = turn(on).generate(args.prompt, max_new_tokens=args.tokens + 1)
            tokens.setdefault(on, result.generated_ids)
            ms[on].append(result.decode_seconds / (len(result.generated_ids) - 1) * 1e3)
        print(f"pair {pair + 1}: on {ms[True][-1]:.2f} ms/token, off {ms[False][-1]:.2f}", file=sys.stderr, flush=True)
    on, off = statistics.median(ms[True]), statistics.median(ms[False])
    wins = sum(a < b for a, b in zip(ms[True], ms[False]))
    title = f"the working tree's {args.piece} (on) and {args.base}'s (off)" if args.piece in ("kernel", "runtime") \
        else f"{args.piece} on and off"
    lines = [f"# CPU decode, {title} in one process ({args.dtype}, {args.threads} threads)", "",
             f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {platform.node()}, {platform.machine()}, {os.cpu_count()} logical CPUs, "
             f"load average at the end {os.getloadavg()[0]:.2f}",
             cpu_line(),
             f"- model: {model.name}, all-CPU plan, {args.experts} experts, {args.tokens} decode tokens per generation, {args.pairs} pairs "
             "in alternating order",
             f"- command: `.venv/bin/python bench/diagnostics/decode_ab.py {' '.join(sys.argv[1:])}`", "",
             "| | ms per token (median) | each generation |", "|---|---|---|",
             f"| on | {on:.2f} | {', '.join(f'{x:.1f}' for x in ms[True])} |",
             f"| off | {off:.2f} | {', '.join(f'{x:.1f}' for x in ms[False])} |", "",
             f"on / off: **{on / off:.3f}** (on faster in {wins} of {args.pairs} pairs); "
             f"same tokens: {'yes' if tokens[True] == tokens[False] else 'no'}"]
    return emit(lines, args.out)


if __name__ == "__main__":
    sys.exit(main())
