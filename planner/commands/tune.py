"""`moeplan tune`: search the plan of highest predicted decode speed for a model on a profiled host (docs/tune.md)."""
from __future__ import annotations

import argparse
import hashlib
import logging
import platform
import re
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from runtime.atomic import check_writable
from runtime.contracts.expert_format import FORMATS
from runtime.errors import UserError

from ..paths import PLANS, PROFILES, shown

log = logging.getLogger(__name__)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MEASURE_PROMPT = "def fibonacci(n):\n    "
MEASURE_NEW_TOKENS = 32


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tune", help="search the fastest plan for a model on a profiled host",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, metavar="NAME|DIR", help="catalog name or checkpoint folder")
    p.add_argument("--profile", metavar="FILE",
                   help="hardware profile (default: profiles/<hostname>.yaml, measured with --quick if missing)")
    p.add_argument("--trace", metavar="FILE", help="routing trace (default: the model's recorded one, else synthetic)")
    p.add_argument("--experts", choices=FORMATS, metavar="FORMAT",
                   help="plan for the routed experts stored as int4 or int8 (or a float dtype): their bytes set "
                        "the memory, copies and CPU reads; the plan records it as model.experts (default: the "
                        "model's dtype)")
    p.add_argument("--context", type=int, default=512, help="tokens in the KV cache at a decode step (512)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of the prefill (128)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--vram-budget", metavar="BYTES", help="accelerator memory to fit in: 12884901888, 12GB, 12GiB "
                        "(default: the profile's)")
    budget.add_argument("--expert-budget-fraction", type=float, metavar="F",
                        help="size the budget to hold this fraction of all experts beside the dense weights, "
                             "KV cache and workspace (e.g. 0.25)")
    p.add_argument("--trials", type=int, default=200, help="trials to run (added to a resumed study's) (200)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (0)")
    p.add_argument("--storage", metavar="URL|FILE",
                   help="Optuna storage: sqlite:///x.db, postgresql://..., or a journal file *.log / *.journal")
    p.add_argument("--study", metavar="NAME", help="study name in --storage (default: <model>-<profile>)")
    p.add_argument("--prefill-slack", type=float, default=0.25,
                   help="choose the fastest decode among Pareto plans whose prefill is within this fraction "
                        "of the fastest (0.25)")
    p.add_argument("--out", metavar="FILE", help="plan to write (default: plans/<profile name>.yaml)")
    p.add_argument("--report", metavar="DIR", help="write plots (PNG) and a Markdown summary here")
    p.add_argument("--measure", type=int, default=0, metavar="K",
                   help="run the K best predicted plans with the runtime (--model must be a checkpoint folder) "
                        "and re-rank by measured decode tokens/s")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_bytes(text: str, flag: str = "--vram-budget") -> int:
    """`12884901888`, `12GB` (10^9) or `12GiB` (2^30) -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise UserError(f"{flag}: {text!r} is not a size (bytes, or a number with B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()]
    if value <= 0:
        raise UserError(f"{flag}: must be > 0, got {text!r}")
    return int(value)


def main(args: argparse.Namespace) -> int:
    from ..routing import workload
    from ..catalog import load_model_shape
    from runtime.contracts.traces import trace_to_jsonl
    from ..tune.evaluation import NO_SLOTS_ON_CPU, Evaluator, cache_capacity
    from ..tune.study import create_study, open_storage, run_study, sampler_seed

    for flag, value, lo in (("--context", args.context, 0), ("--prompt-tokens", args.prompt_tokens, 1),
                            ("--trials", args.trials, 0), ("--measure", args.measure, 0)):
        if value < lo:
            raise UserError(f"{flag}: must be >= {lo}, got {value}")
    if args.expert_budget_fraction is not None and not 0 <= args.expert_budget_fraction <= 1:
        raise UserError(f"--expert-budget-fraction: must be in [0, 1], got {args.expert_budget_fraction}")
    model_dir = Path(args.model).expanduser()
    if args.measure and not model_dir.is_dir():
        raise UserError(f"--measure: needs --model to be a checkpoint folder, got {args.model!r}")
    vram_budget = parse_bytes(args.vram_budget) if args.vram_budget is not None else None

    profile, profile_path = _load_profile(args.profile)
    shape = load_model_shape(args.model, experts=args.experts)
    work = workload.resolve_workload(shape, args.trace, args.prompt_tokens, seed=args.seed)
    trace, trace_source = work.trace, work.source
    log.info("trace: %s", trace_source)
    accelerator = "cuda:0" if profile.has_accelerator else "cpu"
    if args.expert_budget_fraction is not None:
        fixed = cache_capacity(profile, shape, accelerator, args.context, args.prompt_tokens, None).fixed_bytes
        if accelerator == "cpu":  # the cache side of a CPU plan: dense + KV + workspace (not all experts)
            fixed -= shape.expert_bytes_total
        slots = round(args.expert_budget_fraction * shape.num_moe_layers * shape.num_experts)
        vram_budget = fixed + slots * shape.expert_bytes
        # a CPU plan holds no cache slots (logged below): there the fraction only sizes the memory budget
        parts = ("the dense part, KV cache and workspace", "room for") if accelerator == "cpu" else \
            ("everything but the slots", "slots of")
        log.info("budget: %d bytes = %d bytes for %s + %s %d experts (%.0f%% of %d) x %d bytes",
                 vram_budget, fixed, parts[0], parts[1], slots, 100 * args.expert_budget_fraction,
                 shape.num_moe_layers * shape.num_experts, shape.expert_bytes)
    capacity = cache_capacity(profile, shape, accelerator, args.context, args.prompt_tokens, vram_budget)
    out = Path(args.out) if args.out else PLANS / f"{profile.name}.yaml"
    check_writable(out, "--out")  # before the study: a bad path must not cost a tuning run
    if args.report:
        check_writable(args.report, "--report", folder=True)
    model_path = str(args.model) if model_dir.is_dir() else None
    evaluator = Evaluator(profile, shape, trace, accelerator=accelerator, context=args.context,
                          prompt_tokens=args.prompt_tokens, capacity=capacity, vram_budget=vram_budget,
                          model_path=model_path, profile_name=profile.name, scenarios=work.scenarios)
    profile_sha = hashlib.sha256(profile_path.read_bytes()).hexdigest()
    trace_sha = hashlib.sha256(trace_to_jsonl(trace).encode()).hexdigest()
    fingerprint = {"model": shape.name, "experts": shape.expert_format, "profile_sha256": profile_sha, "trace_sha256": trace_sha,
                   "context": args.context, "prompt_tokens": args.prompt_tokens, "vram_budget": vram_budget,
                   "accelerator": accelerator, "max_slots": capacity.max_slots}
    study_name = args.study or f"{shape.name}-{profile.name}"
    storage = open_storage(args.storage)
    seed = sampler_seed(storage, args.seed)
    study = create_study(storage, study_name if args.storage else args.study, seed, fingerprint)
    # printed only now: every argument is checked, so a mistake still gets its one-line error
    for line in routing_report(work):
        print(f"moeplan tune: {line}", file=sys.stderr)
    if capacity.device == "host":
        log.info("tuning %s on %s (cpu): no cache slots (%s), %d more trials", shape.name, profile.name,
                 NO_SLOTS_ON_CPU, args.trials)
    else:
        log.info("tuning %s on %s (%s): up to %d slots of %.1f MiB on the %s, %d more trials",
                 shape.name, profile.name, accelerator, capacity.max_slots, shape.expert_bytes / 2**20,
                 capacity.device, args.trials)
        log.info("prefetch guess accuracy %s", evaluator.prefetch_accuracy_source)

    bar = None
    if not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=args.trials, file=sys.stderr, unit="trial", dynamic_ncols=True)
    best = [0.0]

    def on_trial(number: int, cand) -> None:
        if bar is None:
            return
        if cand.feasible:
            best[0] = max(best[0], cand.decode_tokens_per_s)
        bar.set_postfix_str(f"best decode {best[0]:.2f} tok/s", refresh=False)
        bar.update(1)

    start = time.perf_counter()
    try:
        result = run_study(evaluator, study, args.trials, on_trial, args.prefill_slack)
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - start
    print(render_front(result), flush=True)
    if result.chosen is None:
        if result.interrupted:
            print("moeplan tune: interrupted before any trial finished; no plan written", file=sys.stderr)
            return 130
        raise UserError(f"no feasible plan among {result.trials_total} trials: raise --trials or the budget")

    chosen, measured = result.chosen, {}
    if args.measure and not result.interrupted:
        from ..tune.study import best_by_decode
        chosen, measured = _measure(best_by_decode([c for _, c in result.candidates], args.measure), model_dir)

    import optuna

    predicted = {
        "decode_tokens_per_s": round(chosen.decode_tokens_per_s, 4),
        **({"decode_tokens_per_s_range": [round(v, 4) for v in chosen.decode_range],
            "decode_tokens_per_s_spread": {n: round(v, 4) for n, v in chosen.spread_decode}}
           if chosen.spread_decode else {}),
        "prefill_tokens_per_s": round(chosen.prediction.prefill_tokens_per_s, 4),
        "prefill_seconds": round(chosen.prefill_s, 6),
        "hit_rate": round(chosen.prediction.hit_rate, 4),
        "accelerator_bytes": int(chosen.prediction.memory_bytes.get("accelerator", 0)),
        "host_bytes": int(chosen.prediction.memory_bytes.get("host", 0)),
        "context": args.context, "prompt_tokens": args.prompt_tokens,
    }
    if measured:
        predicted["measured_decode_tokens_per_s"] = round(measured[chosen.plan], 4)
        predicted["measured"] = [{"rank_predicted": i + 1, "decode_tokens_per_s": round(c.decode_tokens_per_s, 4),
                                  "measured_decode_tokens_per_s": round(measured[c.plan], 4),
                                  "slots": sum(c.plan.cache.slots_per_layer(shape.num_moe_layers, shape.num_experts)),
                                  "policy": c.plan.cache.policy, "cpu_threads": c.plan.hardware.cpu_threads}
                                 for i, c in enumerate(measured.ranked)]
    provenance = {
        "tool": "moeplan tune", "profile": shown(profile_path), "profile_sha256": profile_sha,
        "trace": trace_source, "trace_source": trace.header.source, "trace_sha256": trace_sha,
        **({"routing": _routing_provenance(work)} if work.calibration is not None else {}),
        "prefetch_accuracy": evaluator.prefetch_accuracy_source,
        "sampler": f"optuna.samplers.TPESampler(seed={seed})", "seed": args.seed,
        "trials": result.trials_total, "trials_this_run": result.trials_run, "interrupted": result.interrupted,
        "study": study.study_name if args.storage else None, "selection": result.rule if not measured else
        f"highest measured decode tokens/s among the {len(measured.ranked)} best predicted plans",
        "vram_budget": vram_budget, "moeplan": _version("moeplan"), "optuna": optuna.__version__,
        "python": platform.python_version(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    from dataclasses import replace

    from runtime.atomic import write_atomic

    plan = replace(chosen.plan, predicted=predicted, provenance=provenance)
    write_atomic(out, plan.to_yaml())
    if args.report:
        from ..tune.report import write_report
        write_report(Path(args.report), study, evaluator, result, plan, elapsed)
    if chosen.spread_decode:
        lo, hi = chosen.decode_range
        print(f"routing assumed: predicted decode {lo:.2f} to {hi:.2f} tokens/s over the plausible spread of "
              f"locality (" + ", ".join(f"{n} {v:.2f}" for n, v in chosen.spread_decode)
              + f", central {chosen.decode_tokens_per_s:.2f}); the plan maximises the worst case", file=sys.stderr)
    print(f"{'interrupted: ' if result.interrupted else ''}wrote {out}: {chosen.decode_tokens_per_s:.2f} decode "
          f"tokens/s predicted, prefill {chosen.prefill_s:.3f} s, {result.trials_run} trials in {elapsed:.1f} s "
          f"({result.trials_total} in the study)\nchosen by: {provenance['selection']}", file=sys.stderr)
    return 130 if result.interrupted else 0


def routing_report(work) -> list[str]:
    """Lines saying which routing statistics a synthetic trace was calibrated to, from where, and how far it
    landed from them (nothing for a recorded or given trace)."""
    cal = work.calibration
    if cal is None:
        return []
    t = cal.targets
    lines = [f"routing statistics of {t.model}: {t.status}" + (
        f" at MoE layers {', '.join(map(str, t.published_layers))}, interpolated between" if t.published_layers else "")]
    lines += [f"  {name}: {source}" for name, source in t.sources.items()]
    lines.append("  " + cal.summary())
    if t.assumed:
        lines.append("  routing assumed: every plan is also predicted on the ends of the spread, and the search "
                     "maximises the worst case")
    return lines


def _routing_provenance(work) -> dict:
    d = work.routing_dict()
    return {"status": d["status"], "sources": d["sources"], "published_layers": d["published_layers"],
            "fit": {name: {"max_relative_error": v["max_relative_error"],
                           "mean_relative_error": v["mean_relative_error"]} for name, v in d["statistics"].items()},
            "objective": ("worst case of decode tokens/s over the spread " + ", ".join(sorted(work.scenarios))
                          + " and the central trace") if work.scenarios else "the central trace's decode tokens/s"}


def _load_profile(path: str | None):
    from ..profile import Profile

    if path is not None:
        return Profile.load(path), Path(path)
    host = socket.gethostname().split(".")[0] or "host"
    default = PROFILES / f"{host}.yaml"
    if not default.is_file():
        from . import profile as profile_command

        print(f"moeplan tune: no profile for this host at {default}: measuring one with `moeplan profile --quick`",
              file=sys.stderr)
        ns = argparse.Namespace(model=None, out=str(default), name=None, quick=True, accelerator="auto", shape=None,
                                stream_mb=None, pool_mb=None, threads=None, tokens=None, contexts=None,
                                no_progress=False)
        profile_command.main(ns)
    return Profile.load(default), default


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def render_front(result) -> str:
    lines = [f"Pareto front ({len(result.front)} feasible plans of {result.trials_total} trials):",
             f"  {'decode tok/s':>12s} {'prefill s':>10s} {'hit':>6s} {'slots':>5s}  policy  preload threads "
             f"miss   tmt promote lookahead"]
    for c in result.front:
        ch = c.choice
        mark = "*" if c is result.chosen else " "
        spread = f"  worst {c.objective_decode:.3f}" if c.spread_decode else ""
        lines.append(f"{mark} {c.decode_tokens_per_s:12.3f} {c.prefill_s:10.4f} {c.prediction.hit_rate:6.3f} "
                     f"{sum(c.plan.cache.slots):5d}  {ch.policy:7s} {'popular' if ch.preload else 'none':7s} "
                     f"{ch.cpu_threads:7d} {ch.miss_compute[:4]:5s} {ch.transfer_min_tokens:4d} "
                     f"{str(ch.promote):7s} {ch.lookahead:9d}{spread}")
    lines.append(f"* chosen: {result.rule}")
    return "\n".join(lines)


class _Measured(dict):
    """plan -> measured decode tokens/s, with the measured candidates in predicted order."""

    ranked: list


def _measure(cands, model_dir: Path):
    """Run each candidate's plan with the runtime; the best measured one and every measurement."""
    from runtime.session import Session

    measured = _Measured()
    measured.ranked = list(cands)
    for i, c in enumerate(cands):
        plan = c.plan.with_model_path(str(model_dir))
        session = Session.load(plan, model_dir)
        session.generate(MEASURE_PROMPT, max_new_tokens=4)  # warm-up: first-call costs, not the plan's
        result = session.generate(MEASURE_PROMPT, max_new_tokens=MEASURE_NEW_TOKENS)
        measured[c.plan] = result.decode_tokens_per_s
        print(f"measured {i + 1}/{len(cands)}: predicted {c.decode_tokens_per_s:.2f}, measured "
              f"{result.decode_tokens_per_s:.2f} decode tokens/s", file=sys.stderr)
    best = max(cands, key=lambda c: measured[c.plan])
    return best, measured
