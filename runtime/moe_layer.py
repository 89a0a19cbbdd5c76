"""One MoE layer at run time: the cache policy decides each pass, the layer carries the decision out.

Decide: one `PassOutcome` per pass from the layer's cache policy (`route_pass`; `all_cpu_outcome` where the
layer has no slots and a decode token's misses all stay on the CPU), counted once, in `LayerStats.count`.

Execute, in this order (it is what makes the overlap and the slot safety hold):
  1. hits, from their accelerator slots (on CUDA these kernels are queued and run while the CPU works);
  2. misses that go to the accelerator: copy into their slot (or a scratch buffer), compute;
  3. promotions: background copies into their slots (`Prefetcher.copy`), after the reads queued by 1-2;
     the next pass of this layer waits for them;
  4. misses on the CPU, from host memory, with the plan's CPU threads; their sum joins the output;
  5. prefetch (lookahead 1): the next MoE layer guesses its experts from these hidden states and starts
     copying the non-resident guesses into its own slots.
With the CPU as the accelerator, one token's hits and CPU misses run as one fused kernel call (1 and 4
together), where the module fits that kernel: decided once, when the layer is built.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .contracts.cache_policy import LayerCachePolicy, MissRule, PassOutcome, all_cpu_outcome, caches_nothing, route_pass
from .expert_math import add_weighted, module_expert_ffn
from .expert_store import ExpertStore
from .layer_context import LayerContext


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    cpu_misses: int = 0
    accelerator_misses: int = 0
    promotions: int = 0
    prefetch_copies: int = 0
    prefetch_right: int = 0
    bytes_to_accelerator: int = 0
    cpu_expert_seconds: float = 0.0

    def count(self, outcome: PassOutcome, guesses: frozenset[int] = frozenset()) -> None:
        """One pass's decisions; `guesses`: the experts prefetched for this pass (right if needed)."""
        cpu, accelerator = len(outcome.cpu_misses), len(outcome.accelerator_misses)
        self.hits += len(outcome.hits)
        self.misses += cpu + accelerator
        self.cpu_misses += cpu
        self.accelerator_misses += accelerator
        if outcome.entries:
            self.promotions += sum(1 for entry in outcome.entries if not entry.transfer)
        if guesses:
            needed = (*outcome.hits, *outcome.cpu_misses, *outcome.accelerator_misses)
            self.prefetch_right += sum(1 for e in needed if e in guesses)

    def as_dict(self) -> dict:
        total = self.hits + self.misses
        return {**self.__dict__, "hit_rate": self.hits / total if total else 0.0}


@dataclass
class MoeLayer:
    index: int  # position among the model's MoE layers
    module: torch.nn.Module  # transformers' experts module (host weights, flags, _apply_gate)
    router: torch.nn.Module | None  # this layer's router: the previous layer prefetches with it
    store: ExpertStore
    policy: LayerCachePolicy
    rule: MissRule
    context: LayerContext
    stats: LayerStats = field(default_factory=LayerStats)
    next_layer: "MoeLayer | None" = None  # the next MoE layer (this layer's hidden states guess its experts)
    prefetch_into: "MoeLayer | None" = None  # the next MoE layer, where lookahead is on and its cache admits
    # Decided once at build, not per call (the plan and the module do not change after load):
    # the dtype of a token the fused one-token kernel takes here, None where it takes none
    _token_dtype: torch.dtype | None = field(init=False, default=None)
    # whether a one-token pass leaves the cache untouched and computes every expert on the CPU
    _token_caches_nothing: bool = field(init=False, default=False)
    # the CPU executor's fused one-token call for these experts (float or quantized)
    _fused_token: Callable[..., torch.Tensor] = field(init=False, default=None)

    def __post_init__(self) -> None:
        cpu, quantized = self.context.cpu, self.store.quantized
        # the dtype x must have: the experts' own (float), or the one they dequantize into (int8/int4)
        dtype = self.store.host[0].dtype if quantized is None else self.store.dtype
        fits = (cpu.fits_token(self.module, dtype) if quantized is None
                else cpu.fits_token_quantized(self.module, quantized, dtype))
        if self.store.device.type == "cpu" and fits:
            self._token_dtype = dtype
        self._fused_token = cpu.token if quantized is None else cpu.token_quantized
        self._token_caches_nothing = caches_nothing(self.policy, self.rule, 1)

    # ---- the forward pass -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        idx = self.context.route(self.index, top_k_index, top_k_weights)  # [T, k] on the host
        # one token: its k experts in rank order, one token each (a token chooses an expert at most once)
        ranked = idx.tolist()[0] if idx.shape[0] == 1 else None
        rows = None if ranked is not None else _rows_by_expert(idx)  # expert -> (token indices, ranks)
        outcome = self._decide(ranked, rows)
        # the fused kernel reads x's bytes as the weights' dtype: x.dtype is checked, not assumed
        if ranked is not None and x.dtype is self._token_dtype and not outcome.accelerator_misses:
            out = self._token(x, ranked, top_k_weights, outcome)
        else:
            out = self._pass(x, top_k_weights, rows if rows is not None else _rows_by_expert(idx), outcome)
        if self.prefetch_into is not None or self.context.recorder is not None:
            self._guess_next(x)  # 5. the next layer's guesses, from these hidden states
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _guess_next(self, x: torch.Tensor) -> None:
        """Guess the next MoE layer's experts for this pass from this layer's hidden states x: prefetch them
        (lookahead 1), and record them in the trace being recorded, prefetch or not, so that the planner
        can replay prefetch from any recorded trace."""
        nxt = self.next_layer
        if nxt is None or nxt.router is None:
            return
        guesses = self.context.copies.guess(x, nxt.router)
        if self.context.recorder is not None:
            self.context.recorder.record_guesses(nxt.index, guesses)
        if self.prefetch_into is not None:
            self.prefetch_into.prefetch(guesses)

    def prefetch(self, guesses: frozenset[int]) -> None:
        """Admit this layer's guesses for the current pass and start copying the ones that are not resident
        (the previous layer's step 5)."""
        copies, copied = self.context.copies.prefetch(guesses, self.index, self.policy, self.store)
        self.stats.prefetch_copies += copies
        self.stats.bytes_to_accelerator += copied

    # ---- deciding ---------------------------------------------------------------------------
    def _decide(self, ranked: list[int] | None, rows: dict | None) -> PassOutcome:
        """This pass's outcome from the cache policy, counted."""
        if ranked is not None and self._token_caches_nothing:
            # no slots: no copy pending, no guess made; the same outcome as route_pass, without its books
            outcome = all_cpu_outcome(ranked)
            self.stats.count(outcome)
            return outcome
        needed = dict.fromkeys(ranked, 1) if ranked is not None else {e: len(t) for e, (t, _) in rows.items()}
        copies = self.context.copies
        copies.wait(self.index)  # copies into this layer's slots count from the first start after them
        outcome = route_pass(self.policy, needed, self.rule)
        self.stats.count(outcome, copies.take_guesses(self.index))
        return outcome

    # ---- executing --------------------------------------------------------------------------
    def _pass(self, x: torch.Tensor, top_k_weights: torch.Tensor, rows: dict, outcome: PassOutcome) -> torch.Tensor:
        """Steps 1-4 for any number of tokens on any device: the weighted sum, fp32 [T, H]."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in outcome.hits:  # 1. hits
            self._accumulate(out, x, top_k_weights, rows[e], self.store.slot_weights(outcome.hit_slots[e]))
        if outcome.accelerator_misses:  # 2. misses computed on the accelerator
            entered = {entry.expert: entry for entry in outcome.entries}
            for e in outcome.accelerator_misses:
                self._accumulate(out, x, top_k_weights, rows[e], self._bring_in(e, entered))
        if outcome.entries:  # 3. background copies of CPU-computed misses into the cache
            self._promote(outcome)
        if outcome.cpu_misses:  # 4. misses on the CPU threads
            start = time.perf_counter()
            jobs = [(rows[e][0], rows[e][1], e) for e in outcome.cpu_misses]
            out += self.context.cpu.run(self.module, self.store, x, top_k_weights, jobs).to(out.device)
            self.stats.cpu_expert_seconds += time.perf_counter() - start
        return out

    def _token(self, x: torch.Tensor, ranked: list[int], top_k_weights: torch.Tensor,
               outcome: PassOutcome) -> torch.Tensor:
        """Steps 1, 3 and 4 for one token when the accelerator is the CPU (no accelerator misses): every
        expert the token needs, from its slot or from host memory, in one fused kernel call, hits first then
        misses, each ascending as the outcome lists them; then the promotions, which may overwrite a slot
        just read. Same arithmetic as `_pass`, summed in one place. Returns x's shape and dtype."""
        weight_of = dict(zip(ranked, top_k_weights.reshape(-1).tolist()))
        store = self.store
        chosen = [(store.slot_weights(outcome.hit_slots[e]), weight_of[e]) for e in outcome.hits] \
            if outcome.hits else []  # (a comprehension over nothing costs as much as the rest of a lookup)
        chosen += [(store.host_weights(e), weight_of[e]) for e in outcome.cpu_misses]
        start = time.perf_counter()
        out = self._fused_token(x, chosen)
        if outcome.cpu_misses:
            self.stats.cpu_expert_seconds += time.perf_counter() - start
        if outcome.entries:
            self._promote(outcome)
        return out

    def _promote(self, outcome: PassOutcome) -> None:
        """Start the background copies of the CPU misses that entered the cache. An entry whose slot a later
        entry of the same pass took is not copied: only the last one to enter a slot stays."""
        last_in_slot = {entry.slot: entry.expert for entry in outcome.entries}
        copies = [(entry.expert, entry.slot) for entry in outcome.entries
                  if not entry.transfer and last_in_slot[entry.slot] == entry.expert]
        if copies:
            self.stats.bytes_to_accelerator += self.context.copies.copy(self.index, self.store, copies)

    def _bring_in(self, expert: int, entered: dict) -> list[torch.Tensor]:
        """An accelerator miss's weights on the accelerator: copied into its new slot, or to scratch."""
        entry = entered.get(expert)
        if entry is not None:
            self.stats.bytes_to_accelerator += self.store.copy_to_slot(expert, entry.slot)
            return self.store.slot_weights(entry.slot)
        self.stats.bytes_to_accelerator += self.store.expert_bytes
        return self.store.copy_to_scratch(expert)

    def _accumulate(self, out: torch.Tensor, x: torch.Tensor, top_k_weights: torch.Tensor,
                    rows: tuple[torch.Tensor, torch.Tensor], weights: list[torch.Tensor]) -> None:
        tokens, ranks = (r.to(x.device, non_blocking=True) for r in rows)
        y = module_expert_ffn(self.module, x[tokens], *self.store.weights_args(weights),
                              transposed=self.store.transposed)  # [n, H]
        add_weighted(out, tokens, ranks, y, top_k_weights)


def _rows_by_expert(idx: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For each expert in idx [T, k]: the tokens that chose it and at which rank (CPU tensors)."""
    k = idx.shape[1]
    flat = idx.flatten()
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    out = {}
    for e, chunk in zip(experts.tolist(), torch.split(order, counts.tolist())):
        out[e] = (chunk // k, chunk % k)
    return out
