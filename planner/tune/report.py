"""`tune --report DIR`: plots of the study (PNG, matplotlib) and a short Markdown summary.

- history.png: predicted decode tokens/s of each trial (infeasible ones marked) and the best so far;
- importances.png: how much each searched knob explains decode tokens/s (Optuna's default
  importance evaluator over the finished trials);
- hit_rate.png: hit rate of the replayed trace against slots per layer (the same count in every layer)
  for each policy, from the tuner's own hit curves;
- summary.md: the workload, the chosen plan, the rule that chose it and the Pareto front.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from runtime.atomic import write_atomic
from runtime.contracts.cache_policy import POLICIES, MissRule
from runtime.errors import UserError

from .evaluation import NO_SLOTS_ON_CPU, Evaluator
from .study import TuneResult


def write_report(folder: Path, study: Any, evaluator: Evaluator, result: TuneResult, plan: Any,
                 elapsed_s: float) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--report: {folder} is a file or lies under one; give a folder") from None
    written = [_history(folder, result, plt), _importances(folder, study, plt), _hit_rates(folder, evaluator, plt)]
    written.append(write_atomic(folder / "summary.md", _summary(evaluator, result, plan, elapsed_s)))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def _history(folder: Path, result: TuneResult, plt: Any) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    ok = [(n, c.decode_tokens_per_s) for n, c in result.candidates if c.feasible]
    bad = [(n, c.decode_tokens_per_s) for n, c in result.candidates if not c.feasible]
    if ok:
        ax.scatter(*zip(*ok), s=10, label="trial (fits)")
        best, running = [], 0.0
        for n, v in sorted(ok):
            running = max(running, v)
            best.append((n, running))
        ax.step(*zip(*best), where="post", color="C3", label="best so far")
    if bad:
        ax.scatter(*zip(*bad), s=10, marker="x", color="grey", label="does not fit")
    ax.set_xlabel("trial")
    ax.set_ylabel("predicted decode tokens/s")
    ax.set_title("optimisation history")
    ax.legend()
    return _save(fig, folder / "history.png", plt)


def _importances(folder: Path, study: Any, plt: Any) -> Path:
    import optuna

    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        with warnings.catch_warnings():  # it warns on every call that it ranks low targets as good: negated here
            warnings.simplefilter("ignore", UserWarning)
            imp = optuna.importance.get_param_importances(study, target=lambda t: -t.values[0])
    except (RuntimeError, ValueError) as exc:  # too few trials, or a single value of every knob
        imp = {}
        ax.text(0.5, 0.5, f"no importances: {exc}", ha="center", va="center", wrap=True)
    if imp:
        names = list(imp)[::-1]
        ax.barh(names, [imp[n] for n in names])
        ax.set_xlabel("importance for predicted decode tokens/s")
    ax.set_title("parameter importances")
    return _save(fig, folder / "importances.png", plt)


def _hit_rates(folder: Path, evaluator: Evaluator, plt: Any) -> Path:
    trace = evaluator.trace
    L, E = trace.header.num_layers, trace.header.num_experts
    needed = sum(len(trace.tokens_per_expert(i, l)) for i in range(len(trace.passes)) for l in range(L))
    fig, ax = plt.subplots(figsize=(7, 4))
    for policy in POLICIES:
        curves = evaluator.curves(policy, policy == "static", MissRule("cpu", 0, True))
        ax.plot(range(E + 1), [sum(c[s] for c in curves) / needed for s in range(E + 1)], marker="o", label=policy)
    ax.set_xlabel("slots per MoE layer (every layer)")
    ax.set_ylabel("hit rate over the trace")
    ax.set_title("hit rate against cache size (misses promoted; static: popular preload)")
    ax.legend()
    return _save(fig, folder / "hit_rate.png", plt)


def _summary(evaluator: Evaluator, result: TuneResult, plan: Any, elapsed_s: float) -> str:
    c = result.chosen
    lines = [f"# moeplan tune: {evaluator.shape.name} on {evaluator.profile_name}", "",
             f"- trials: {result.trials_total} in the study, {result.trials_run} in this run ({elapsed_s:.1f} s)"
             + (" - interrupted" if result.interrupted else ""),
             f"- accelerator {evaluator.accelerator}; " + (
                 f"up to {evaluator.capacity.max_slots} expert slots fit" if evaluator.capacity.device != "host"
                 else f"no expert slots ({NO_SLOTS_ON_CPU})"),
             f"- context {evaluator.context}, prompt {evaluator.prompt_tokens} tokens",
             f"- chosen by: {result.rule}", ""]
    if c is not None:
        p = plan.predicted or {}
        lines += [f"Chosen plan: {c.choice.policy}, {sum(c.plan.cache.slots)} slots {list(c.plan.cache.slots)}, "
                  f"preload {'popular' if c.choice.preload else 'none'}, {c.choice.cpu_threads} threads, miss on "
                  f"{c.choice.miss_compute}, transfer_min_tokens {c.choice.transfer_min_tokens}, promote "
                  f"{c.choice.promote}, lookahead {c.choice.lookahead}.", "",
                  f"Predicted: {c.decode_tokens_per_s:.3f} decode tokens/s, prefill {c.prefill_s:.4f} s, "
                  f"hit rate {c.prediction.hit_rate:.3f}"
                  + (f"; measured {p['measured_decode_tokens_per_s']} decode tokens/s"
                     if "measured_decode_tokens_per_s" in p else "") + ".", ""]
    lines += ["## Pareto front", "", "| decode tok/s | prefill s | hit rate | slots | policy | preload | threads "
              "| miss | transfer_min_tokens | promote | lookahead |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in result.front:
        ch = f.choice
        lines.append(f"| {f.decode_tokens_per_s:.3f} | {f.prefill_s:.4f} | {f.prediction.hit_rate:.3f} | "
                     f"{sum(f.plan.cache.slots)} | {ch.policy} | {'popular' if ch.preload else 'none'} | "
                     f"{ch.cpu_threads} | {ch.miss_compute} | {ch.transfer_min_tokens} | {ch.promote} | "
                     f"{ch.lookahead} |")
    lines += ["", "![history](history.png) ![importances](importances.png) ![hit rate](hit_rate.png)", ""]
    return "\n".join(lines)
