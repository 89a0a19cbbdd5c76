"""One MoE layer at run time: split the pass's experts into hits and misses, compute each where the plan says.

Order of work in one pass (it is what makes the overlap and the slot safety hold):
  1. hits, from their accelerator slots (on CUDA these kernels are queued and run while the CPU works);
  2. misses that go to the accelerator: copy into their slot (or a scratch buffer), compute;
  3. promotions: background copies into their slots, on a side stream that first waits for 1-2, so a
     slot is never overwritten while a kernel still reads it; the next pass of this layer waits for them;
  4. misses on the CPU, from host memory, with the plan's CPU threads; their sum joins the output;
  5. prefetch (lookahead 1): guess the next MoE layer's experts with its router and copy the
     non-resident guesses into its cache in the background.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .contracts.cache_policy import LayerCachePolicy, MissRule, route_pass
from .cpu_executor import CpuExecutor
from .expert_math import add_weighted, module_expert_ffn
from .expert_store import ExpertStore

if TYPE_CHECKING:
    from .engine import Engine


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

    def as_dict(self) -> dict:
        total = self.hits + self.misses
        return {**self.__dict__, "hit_rate": self.hits / total if total else 0.0}


@dataclass
class MoeLayer:
    index: int  # position among the model's MoE layers
    module: torch.nn.Module  # transformers' experts module (host weights, flags, _apply_gate)
    router: torch.nn.Module | None  # this layer's router, used by the previous layer to prefetch
    store: ExpertStore
    policy: LayerCachePolicy
    rule: MissRule
    engine: "Engine"
    cpu: CpuExecutor
    next: "MoeLayer | None" = None
    stats: LayerStats = field(default_factory=LayerStats)
    _pending: object = None  # CUDA event of the latest background copy into this layer's slots
    _guesses: frozenset[int] = frozenset()  # experts the previous layer prefetched for this pass

    # ---- the forward pass -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        engine = self.engine
        top_k_index = engine.routing_override(self.index, top_k_index)
        # [T, k]: routing decisions are made on the host
        idx = top_k_index if top_k_index.is_cpu else top_k_index.to("cpu")
        engine.record_routing(self.index, idx, top_k_weights)
        if idx.shape[0] == 1 and self.host_only and x.is_cpu and self.cpu.fits_token(self.module, x.dtype):
            out = self._token_from_host(x, idx.tolist()[0], top_k_weights)  # a decode token, no cache here
            if engine.lookahead and self.next is not None:  # the next layer may have a cache to prefetch into
                self._prefetch_next(x)
            return out
        # one token needs its k experts in rank order, one token each (it chooses an expert at most once)
        ids = idx[0].tolist() if idx.shape[0] == 1 else None
        rows = None if ids is not None else _rows_by_expert(idx)  # expert -> (token indices, rank positions)
        tokens_per_expert = dict.fromkeys(ids, 1) if ids is not None else \
            {e: len(tokens) for e, (tokens, _) in rows.items()}
        self._wait_for_copies()
        outcome = route_pass(self.policy, tokens_per_expert, self.rule)
        self._count(outcome, tokens_per_expert)
        entered, promotions = {}, []
        if outcome.entries:
            entered = {entry.expert: entry for entry in outcome.entries}
            last_in_slot = {entry.slot: entry.expert for entry in outcome.entries}
            promotions = [en for en in outcome.entries if not en.transfer and last_in_slot[en.slot] == en.expert]

        if ids is not None and x.device.type == "cpu" and not outcome.accelerator_misses \
                and self.cpu.fits_token(self.module, x.dtype):
            out = self._token_on_cpu(x, ids, top_k_weights, outcome, promotions)
        else:
            rows = rows if rows is not None else _rows_by_expert(idx)
            out = self._pass(x, top_k_weights, rows, outcome, entered, promotions)
        if engine.lookahead and self.next is not None:  # 5. prefetch for the next MoE layer
            self._prefetch_next(x)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @cached_property  # the plan's cache size and miss rule do not change after load
    def host_only(self) -> bool:
        """Whether every expert of every pass is a CPU miss: a cache of no slots (`accelerator: cpu` plans),
        misses computed on the CPU. Then `route_pass` would only count, and one token takes a shorter path."""
        return self.policy.slots == 0 and self.rule.compute == "cpu" and not self.rule.on_accelerator(1)

    def _token_from_host(self, x: torch.Tensor, ranked: list[int], top_k_weights: torch.Tensor) -> torch.Tensor:
        """One token's experts (`ranked`: in rank order) from host memory, in one fused kernel call, in
        ascending id order as `route_pass` orders misses; counted as `route_pass` and `_count` would count
        them: k misses, all on the CPU."""
        gate = top_k_weights.reshape(-1).tolist()
        store = self.store
        chosen = sorted((e, store.host_weights(e), gate[rank]) for rank, e in enumerate(ranked))
        start = time.perf_counter()
        out = self.cpu.token(x, [(weights, g) for _, weights, g in chosen])
        s = self.stats
        s.cpu_expert_seconds += time.perf_counter() - start
        s.misses += len(ranked)
        s.cpu_misses += len(ranked)
        return out

    def _pass(self, x: torch.Tensor, top_k_weights: torch.Tensor, rows: dict, outcome, entered: dict,
              promotions: list) -> torch.Tensor:
        """Steps 1-4 for any number of tokens on any device: the weighted sum, fp32 [T, H]."""
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in outcome.hits:  # 1. hits
            self._accumulate(out, x, top_k_weights, rows[e], self.store.slot_weights(outcome.hit_slots[e]))
        for e in outcome.accelerator_misses:  # 2. misses computed on the accelerator
            self._accumulate(out, x, top_k_weights, rows[e], self._bring_in(e, entered))
        if promotions:  # 3. background copies of CPU-computed misses into the cache
            self._copy_in_background([(en.expert, en.slot) for en in promotions], self)
        if outcome.cpu_misses:  # 4. misses on the CPU threads
            start = time.perf_counter()
            jobs = [(rows[e][0], rows[e][1], e) for e in outcome.cpu_misses]
            out += self.cpu.run(self.module, self.store, x, top_k_weights, jobs).to(out.device)
            self.stats.cpu_expert_seconds += time.perf_counter() - start
        return out

    def _token_on_cpu(self, x: torch.Tensor, ids: list[int], top_k_weights: torch.Tensor, outcome,
                      promotions: list) -> torch.Tensor:
        """Steps 1, 3 and 4 for one token when the accelerator is the CPU (no accelerator misses): every
        expert the token needs, from its slot or from host memory, in one fused kernel call; then the
        promotions, which may overwrite a slot just read. Same arithmetic as `_pass`, summed in one place."""
        gate = top_k_weights.reshape(-1).tolist()
        weight_of = {e: gate[rank] for rank, e in enumerate(ids)}
        chosen = [(self.store.slot_weights(outcome.hit_slots[e]), weight_of[e]) for e in outcome.hits]
        chosen += [(self.store.host_weights(e), weight_of[e]) for e in outcome.cpu_misses]
        start = time.perf_counter()
        out = self.cpu.token(x, chosen)
        if outcome.cpu_misses:
            self.stats.cpu_expert_seconds += time.perf_counter() - start
        if promotions:
            self._copy_in_background([(en.expert, en.slot) for en in promotions], self)
        return out

    def _bring_in(self, expert: int, entered: dict) -> list[torch.Tensor]:
        """An accelerator miss's weights on the accelerator: copied into its new slot, or to scratch."""
        entry = entered.get(expert)
        if entry is not None:
            self.stats.bytes_to_accelerator += self.store.copy_to_slot(expert, entry.slot)
            return self.store.slot_weights(entry.slot)
        self.stats.bytes_to_accelerator += self.store.expert_bytes
        return self.store.copy_to_scratch(expert)

    # ---- helpers ----------------------------------------------------------------------------
    def _accumulate(self, out: torch.Tensor, x: torch.Tensor, top_k_weights: torch.Tensor,
                    rows: tuple[torch.Tensor, torch.Tensor], weights: list[torch.Tensor]) -> None:
        tokens, ranks = (r.to(x.device, non_blocking=True) for r in rows)
        y = module_expert_ffn(self.module, x[tokens], *self.store.weights_args(weights))  # [n, H]
        add_weighted(out, tokens, ranks, y, top_k_weights)

    def _count(self, outcome, tokens_per_expert: dict[int, int]) -> None:
        s = self.stats
        s.hits += len(outcome.hits)
        s.misses += len(outcome.cpu_misses) + len(outcome.accelerator_misses)
        s.cpu_misses += len(outcome.cpu_misses)
        s.accelerator_misses += len(outcome.accelerator_misses)
        s.promotions += sum(1 for en in outcome.entries if not en.transfer)
        if self._guesses:
            s.prefetch_right += len(self._guesses & tokens_per_expert.keys())
            self._guesses = frozenset()

    def _wait_for_copies(self) -> None:
        if self._pending is not None:
            torch.cuda.current_stream(self.store.device).wait_event(self._pending)
            self._pending = None

    def _copy_in_background(self, copies: list[tuple[int, int]], target: "MoeLayer") -> None:
        """Copy (expert, slot) pairs into `target`'s slots; on CUDA on the side stream, after queued reads."""
        stream = self.engine.copy_stream
        if stream is None:  # accelerator: cpu, the copy is an ordinary memory copy
            for expert, slot in copies:
                target.stats.bytes_to_accelerator += target.store.copy_to_slot(expert, slot)
            return
        stream.wait_stream(torch.cuda.current_stream(target.store.device))
        with torch.cuda.stream(stream):
            for expert, slot in copies:
                target.stats.bytes_to_accelerator += target.store.copy_to_slot(expert, slot)
            event = torch.cuda.Event()
            event.record(stream)
        target._pending = event

    def _prefetch_next(self, x: torch.Tensor) -> None:
        nxt = self.next
        if nxt.router is None or not nxt.policy.admits:
            return
        logits = F.linear(x, nxt.router.weight.to(x.dtype))  # [T, E]: the next router on these hidden states
        k = self.engine.top_k
        guesses = frozenset(torch.topk(logits, k, dim=-1).indices.flatten().tolist())
        copies = []
        for g in sorted(guesses):
            if g in nxt.policy:
                continue
            placed = nxt.policy.admit(g, used=False, protected=guesses)
            if placed is not None:
                copies.append((g, placed[0]))
        nxt.stats.prefetch_copies += len(copies)
        nxt._guesses = guesses
        if copies:
            self._copy_in_background(copies, nxt)


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
