"""The tuner's search space: what a trial picks (`Choice`), the ranges it draws from (`Space`), and how an
Optuna trial draws it (`suggest`). Knobs that cannot matter for a drawn point are fixed (`canonical`), so
that one plan is one point."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from runtime.contracts.cache_policy import MISS_COMPUTE, POLICIES

TRANSFER_MIN_TOKENS = (0, 8, 32, 128)  # 0 = never; powers of two around a prompt's tokens per expert


@dataclass(frozen=True)
class Choice:
    """One point of the search space (before the budget is split across layers)."""

    budget: int  # expert slots in all layers together
    policy: str  # lru | lfu | fifo | adaptive | markov | static
    preload: bool  # True: the most used experts per layer are loaded before the first token
    cpu_threads: int
    miss_compute: str  # cpu | accelerator
    transfer_min_tokens: int  # 0 = never copy a CPU miss for its token count
    promote: bool
    lookahead: int  # 0 | 1

    def canonical(self) -> "Choice":
        """The same plan with the knobs that cannot matter set to fixed values (one grid point per plan)."""
        c = self
        if c.budget == 0:  # no slot: nothing to evict, preload, promote into or prefetch into
            c = Choice(0, "lru", False, c.cpu_threads, c.miss_compute, c.transfer_min_tokens, False, 0)
        if c.policy == "static":  # static keeps its preloaded set: no promotion, no prefetch
            c = Choice(c.budget, c.policy, True, c.cpu_threads, c.miss_compute, c.transfer_min_tokens, False, 0)
        if c.miss_compute == "accelerator":  # every miss is copied: the token threshold and promotion are moot
            c = Choice(c.budget, c.policy, c.preload, c.cpu_threads, c.miss_compute, 0, False, c.lookahead)
        return c

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Space:
    """The ranges the search draws from."""

    max_budget: int  # slots that fit the memory (at most layers x experts)
    max_threads: int  # physical cores of the profile

    def choices(self) -> Iterator[Choice]:
        """Every canonical point, for the exhaustive grid (bench/tune_vs_grid.py)."""
        seen: set[Choice] = set()
        for budget in range(self.max_budget + 1):
            for policy in POLICIES:
                for preload in (False, True):
                    for threads in range(1, self.max_threads + 1):
                        for compute in MISS_COMPUTE:
                            for tmt in TRANSFER_MIN_TOKENS:
                                for promote in (False, True):
                                    for lookahead in (0, 1):
                                        c = Choice(budget, policy, preload, threads, compute, tmt, promote,
                                                   lookahead).canonical()
                                        if c not in seen:
                                            seen.add(c)
                                            yield c


def suggest(trial: Any, space: Space) -> Choice:
    """Draw a choice from an Optuna trial; knobs that cannot matter for the drawn policy are not drawn."""
    budget = trial.suggest_int("budget", 0, space.max_budget)
    policy = trial.suggest_categorical("policy", list(POLICIES))
    threads = trial.suggest_int("cpu_threads", 1, space.max_threads)
    compute = trial.suggest_categorical("miss_compute", list(MISS_COMPUTE))
    preload, promote, lookahead, tmt = True, False, 0, 0
    if policy != "static":
        preload = trial.suggest_categorical("preload", ["none", "popular"]) == "popular"
        lookahead = trial.suggest_int("lookahead", 0, 1)
    if compute == "cpu":
        tmt = trial.suggest_categorical("transfer_min_tokens", list(TRANSFER_MIN_TOKENS))
        if policy != "static":
            promote = trial.suggest_categorical("promote", [False, True])
    return Choice(budget, policy, preload, threads, compute, tmt, promote, lookahead).canonical()
