"""The search behind `moeplan tune`: a seeded multi-objective Optuna study over `space.Choice`.

Objectives: predicted decode tokens/s (maximise) and predicted prefill seconds of the prompt
(minimise). Plans that do not fit memory are infeasible through the trial's constraint (`Trial.set_constraint`, read by TPE)
(the overshoot in bytes, <= 0 when it fits), never just penalised, and never chosen. The study may
live in any Optuna storage so that it resumes and several workers share it; Ctrl-C ends the loop
cleanly and the trials finished so far are kept.

The chosen plan: among the feasible Pareto plans, the highest decode tokens/s whose prefill time is
within `prefill_slack` (a fraction) of the fastest feasible prefill (`choose`). Decode tokens/s here is
`Candidate.objective_decode`: the prediction on the trace, or where the routing is only assumed the worst
case over its plausible spread (evaluation.py says why).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import UserError

from .evaluation import Candidate, Evaluator
from .space import Choice, suggest

log = logging.getLogger(__name__)

SAMPLER = "TPESampler"
_SCHEMA_RACE = ("IntegrityError", "ProgrammingError")  # sqlalchemy's errors for a table made meanwhile
_SCHEMA_ATTEMPTS = 5


@dataclass(frozen=True)
class TuneResult:
    candidates: tuple[tuple[int, Candidate], ...]  # (trial number, candidate) of every finished trial
    front: tuple[Candidate, ...]  # feasible Pareto plans, fastest decode first
    chosen: Candidate | None  # None when no trial finished feasible
    rule: str  # the sentence that says why `chosen`
    trials_total: int  # finished trials in the study (earlier runs included)
    trials_run: int  # trials this call finished
    interrupted: bool  # stopped by Ctrl-C


def open_storage(url: str | None) -> Any:
    """None (in memory), an RDB URL (sqlite:///x.db, postgresql://...), or a journal file (*.log, *.journal)."""
    import optuna

    if url is None:
        return None
    if url.endswith((".log", ".journal")) and "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            Path(url).expanduser().parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(Path(url).expanduser())))
        except (OSError, ValueError) as exc:  # a folder, a path under a file, a log that is not optuna's JSON
            raise UserError(f"--storage: cannot open journal {url!r}: {exc.__class__.__name__}: {exc}"
                            .splitlines()[0][:300]) from None
    if "://" not in url:
        raise UserError(f"--storage: {url!r} is neither a database URL (sqlite:///FILE, postgresql://...) "
                        f"nor a journal file ending in .log or .journal")
    for attempt in range(_SCHEMA_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(url)
        except ImportError:  # optuna's message for a URL whose database driver is not installed
            raise UserError(f"--storage: no database driver for {url.split(':', 1)[0]!r}; for PostgreSQL: "
                            f"pip install 'moeplan[postgres]'") from None
        except Exception as exc:  # optuna/sqlalchemy raise many kinds for a bad URL or an unreachable server
            # Workers that open a fresh database at once race to create optuna's tables (PostgreSQL:
            # a duplicate key in pg_type); the loser finds them made when it tries again.
            if type(exc).__name__ in _SCHEMA_RACE and attempt + 1 < _SCHEMA_ATTEMPTS:
                time.sleep(0.2 * (attempt + 1))
                continue
            raise UserError(f"--storage: cannot open {url!r}: {exc.__class__.__name__}: {exc}".splitlines()[0]) from None
    raise AssertionError("unreachable")


def sampler_seed(storage: Any, seed: int) -> int:
    """The TPE sampler's seed: `seed` for a study in memory (a run is reproducible); for a study in a
    storage, which several workers may share, `seed` mixed with this process's id, so that workers
    started alike do not propose the same trials (what Optuna advises for parallel workers). The plan
    written is the best of the study's trials either way; only their order depends on the workers."""
    return seed if storage is None else (seed * 1_000_003 + os.getpid()) % 2**32


def create_study(storage: Any, study_name: str | None, seed: int, fingerprint: dict[str, Any]) -> Any:
    """A new study, or the stored one of that name; refuses to resume a study of another workload."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # per-trial lines would drown the progress bar
    sampler = optuna.samplers.TPESampler(seed=seed)
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, sampler=sampler,
                                    directions=["maximize", "minimize"], load_if_exists=storage is not None)
    except json.JSONDecodeError as exc:  # a --storage journal file that holds other text than optuna's log
        raise UserError(f"--storage: the journal file is not an optuna journal ({exc})") from None
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", fingerprint)
    elif stored != fingerprint:
        diff = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        raise UserError(f"--study {study_name}: the stored study was tuned for another workload "
                        f"(differs in {', '.join(diff)}); use another --study name")
    return study


def run_study(evaluator: Evaluator, study: Any, trials: int,
              on_trial: Callable[[int, Candidate], None] | None = None,
              prefill_slack: float = 0.25) -> TuneResult:
    """Run `trials` more trials of `study` (Ctrl-C stops early), then rebuild every trial's candidate."""
    import optuna

    space = evaluator.space
    before = _finished(study)

    def objective(trial: Any) -> tuple[float, float]:
        choice = suggest(trial, space)
        cand = evaluator.evaluate(choice)
        trial.set_user_attr("choice", choice.as_dict())
        trial.set_user_attr("slots", list(cand.plan.cache.slots))
        # Optuna 5: the sampler reads constraints set on the trial (<= 0 feasible); this replaces
        # the deprecated `constraints_func`.
        trial.set_constraint("memory_excess_bytes", float(cand.excess_bytes))
        if on_trial is not None:
            on_trial(trial.number, cand)
        return cand.objective_decode, cand.prefill_s

    # Ctrl-C is turned into a request that stops the study between trials: a KeyboardInterrupt raised
    # inside Optuna's bookkeeping of a trial can surface as another exception (optuna 5 raises
    # UnboundLocalError from `_run_trial`). A second Ctrl-C interrupts at once.
    requested = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    def stop_if_requested(study: Any, trial: Any) -> None:
        if requested.is_set():
            study.stop()

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    try:
        study.optimize(objective, n_trials=trials, gc_after_trial=False, callbacks=[stop_if_requested])
    except KeyboardInterrupt:
        requested.set()
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    interrupted = requested.is_set()
    if interrupted:
        log.warning("interrupted: keeping the %d trials finished so far", _finished(study) - before)
    return summarize(evaluator, study, before, interrupted, prefill_slack)


def _finished(study: Any) -> int:
    import optuna

    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


def summarize(evaluator: Evaluator, study: Any, before: int, interrupted: bool, prefill_slack: float) -> TuneResult:
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    cands = []
    for t in done:
        if "choice" in t.user_attrs:  # re-evaluated (memoised, deterministic): a resumed study's old trials too
            cands.append((t.number, evaluator.evaluate(Choice(**t.user_attrs["choice"]))))
    front = pareto_front([c for _, c in cands if c.feasible])
    chosen, rule = choose(front, prefill_slack)
    return TuneResult(tuple(cands), tuple(front), chosen, rule, len(done), len(done) - before, interrupted)


def pareto_front(cands: Sequence[Candidate]) -> list[Candidate]:
    """Candidates no other beats on both objectives (distinct plans), fastest decode first."""
    unique: dict[Any, Candidate] = {}
    for c in cands:
        unique.setdefault(c.plan, c)
    pool = list(unique.values())
    front = [c for c in pool
             if not any(o.objective_decode >= c.objective_decode and o.prefill_s <= c.prefill_s
                        and (o.objective_decode > c.objective_decode or o.prefill_s < c.prefill_s)
                        for o in pool)]
    return sorted(front, key=lambda c: (-c.objective_decode, c.prefill_s))


def choose(front: Sequence[Candidate], prefill_slack: float) -> tuple[Candidate | None, str]:
    """The fastest-decode plan of the front whose prefill is within `prefill_slack` of the front's fastest."""
    if prefill_slack < 0:
        raise UserError(f"--prefill-slack: must be >= 0, got {prefill_slack}")
    decode = "highest predicted decode tokens/s"
    if front and front[0].spread_decode:
        decode = ("highest worst-case predicted decode tokens/s over the routing's plausible spread ("
                  + ", ".join(n for n, _ in front[0].spread_decode) + " and central)")
    rule = (f"{decode} among the feasible Pareto plans whose prefill time is within {prefill_slack:.0%} of the "
            f"fastest feasible prefill")
    if not front:
        return None, rule
    fastest = min(c.prefill_s for c in front)
    eligible = [c for c in front if c.prefill_s <= fastest * (1 + prefill_slack)]
    return max(eligible, key=lambda c: (c.objective_decode, -c.prefill_s)), rule


def best_by_decode(cands: Sequence[Candidate], k: int) -> list[Candidate]:
    """The `k` feasible distinct plans of highest predicted decode tokens/s (for --measure)."""
    unique: dict[Any, Candidate] = {}
    for c in cands:
        if c.feasible:
            unique.setdefault(c.plan, c)
    return sorted(unique.values(), key=lambda c: (-c.objective_decode, c.prefill_s))[:k]

