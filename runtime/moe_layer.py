"""One MoE layer at run time: the cache policy decides each pass, the layer carries the decision out.

Decide: one `PassOutcome` per pass from the layer's cache policy (`route_pass`; `all_cpu_outcome` where the
layer has no slots and a decode token's misses all stay on the CPU), counted once, in `LayerStats.count`.

Execute with `accelerator: cpu`, in this order (it is what makes the slot safety hold):
  1. hits, from their slots;
  2. misses that go to the accelerator: copy into their slot (or a scratch buffer), compute;
  3. promotions: copies into their slots (`Prefetcher.copy`), after the reads of 1-2;
  4. misses on the CPU, from host memory, with the plan's CPU threads; their sum joins the output;
  5. prefetch (lookahead 1): the next MoE layer guesses its experts from these hidden states and copies
     the non-resident guesses into its own slots.
One token's hits and CPU misses run as one fused kernel call (1 and 4 together), where the module fits
that kernel: decided once, when the layer is built.

Execute on a CUDA plan (DESIGN.md, "the CUDA execution order"), every accelerator call through the device
seam (runtime/device.py), `_forward_accelerated`:
  1. ONE blocking host sync brings the router's ids (none when routing is replayed: those are on the host
     already), its gate weights and the hidden states to pinned host buffers together;
  2. hits and accelerator misses are queued on the compute stream (a decode token needs no index copy;
     a longer pass sends all its token indices in one pinned copy); an accelerator miss's copy goes on
     the copy stream, double-buffered: the next one's copy is queued before this one's compute
     (`_transfers`);
  5. the next layer's guesses, made on the host from the host copy of the hidden states (no sync), and
     its prefetch copies, queued on the copy stream BEFORE this layer's promotions;
  3. promotions queued on the copy stream; then the CPU misses run on the CPU threads while the device
     computes the hits (one token: the fused one-token kernel on the CPU misses);
  4. their sum goes to the device from a pinned buffer without blocking the host.
A layer's compute waits only for the copies into its own slots (`Prefetcher.wait`, an event).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .contracts.cache_policy import LayerCachePolicy, MissRule, PassOutcome, all_cpu_outcome, caches_nothing, route_pass
from .device import DeviceSeam
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
    # a CUDA plan's device seam (None with accelerator: cpu), and on it the dtype of a token whose CPU
    # misses the fused one-token kernel takes (None where it takes none)
    _seam: DeviceSeam | None = field(init=False, default=None)
    _cpu_token_dtype: torch.dtype | None = field(init=False, default=None)
    # this layer's router weight in host memory: the previous layer guesses this layer's experts with it
    # (on a CUDA plan from the host copy of its hidden states, so that a guess costs no sync)
    guess_weight: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        cpu, quantized = self.context.cpu, self.store.quantized
        # the dtype x must have: the experts' own (float), or the one they dequantize into (int8/int4)
        dtype = self.store.host[0].dtype if quantized is None else self.store.dtype
        fits = (cpu.fits_token(self.module, dtype) if quantized is None
                else cpu.fits_token_quantized(self.module, quantized, dtype))
        self._seam = self.context.seam
        if self._seam is None and self.store.device.type == "cpu" and fits:
            self._token_dtype = dtype
        if self._seam is not None and fits:
            self._cpu_token_dtype = dtype
        self._fused_token = cpu.token if quantized is None else cpu.token_quantized
        self._token_caches_nothing = caches_nothing(self.policy, self.rule, 1)
        if self.router is not None:  # a no-op on the CPU; one copy of E x H weights from a device
            self.guess_weight = self.router.weight.detach().to("cpu")

    # ---- the forward pass -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self._seam is not None:
            return self._forward_accelerated(x, top_k_index, top_k_weights)
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
        if nxt is None or nxt.guess_weight is None:
            return
        guesses = self.context.copies.guess(x, nxt.guess_weight)
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

    # ---- a CUDA plan's layer ------------------------------------------------------------------
    def _forward_accelerated(self, x: torch.Tensor, top_k_index: torch.Tensor,
                             top_k_weights: torch.Tensor) -> torch.Tensor:
        """The CUDA execution order (module docstring), every device call through the seam."""
        seam, context = self._seam, self.context
        # 1. the one blocking host sync: ids (unless replayed), gate weights, hidden states, together
        if context.replay is None:
            ids_host, w_host, x_host = seam.fetch(self.index, (top_k_index, top_k_weights, x))
        else:
            w_host, x_host = seam.fetch(self.index, (top_k_weights, x))
            ids_host = top_k_index  # only its shape is read: the replay's ids are on the host
        idx = context.route(self.index, ids_host, w_host)
        ranked = idx.tolist()[0] if idx.shape[0] == 1 else None
        rows = None if ranked is not None else _rows_by_expert(idx)
        outcome = self._decide(ranked, rows)
        # 2. hits and accelerator misses, queued on the compute stream
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        on_device = [*outcome.hits, *outcome.accelerator_misses]
        if on_device:
            where = self._device_rows(ranked, rows, on_device)
            for e in outcome.hits:
                seam.launch(self.index, f"hit {e}", self._device_expert, out, x, top_k_weights, where[e],
                            self.store.slot_weights(outcome.hit_slots[e]))
            if outcome.accelerator_misses:
                self._transfers(outcome, out, x, top_k_weights, where)
        # 5. the next layer's guesses from the host copy of x, its prefetch queued before our promotions
        if self.prefetch_into is not None or context.recorder is not None:
            self._guess_next(x_host)
        if outcome.entries:
            self._promote(outcome)
        # 3. the CPU misses on the CPU threads, while the device computes what 2 queued
        if outcome.cpu_misses:
            start = time.perf_counter()
            if ranked is not None and x_host.dtype is self._cpu_token_dtype:
                weight_of = dict(zip(ranked, w_host.reshape(-1).tolist()))
                cpu_out = self._fused_token(x_host, [(self.store.host_weights(e), weight_of[e])
                                                     for e in outcome.cpu_misses])
            else:
                by_expert = rows if rows is not None else _rows_by_expert(idx)
                jobs = [(by_expert[e][0], by_expert[e][1], e) for e in outcome.cpu_misses]
                cpu_out = context.cpu.run(self.module, self.store, x_host, w_host, jobs)
            self.stats.cpu_expert_seconds += time.perf_counter() - start
            # 4. their sum to the device from a pinned buffer, without blocking the host
            out += seam.send(self.index, "cpu sum", cpu_out)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _device_rows(self, ranked: list[int] | None, rows: dict | None, experts: list[int]) -> dict:
        """Where each expert computed on the device reads its tokens and gate weights: a decode token's rank
        (no index tensor at all), or (token indices, ranks) on the device, sent in ONE pinned copy."""
        if ranked is not None:
            return {e: ranked.index(e) for e in experts}
        parts = [part for e in experts for part in rows[e]]
        sizes = [len(p) for p in parts]
        flat = self._seam.send(self.index, "token indices", torch.cat(parts))
        pieces = torch.split(flat, sizes)
        return {e: (pieces[2 * i], pieces[2 * i + 1]) for i, e in enumerate(experts)}

    def _device_expert(self, out: torch.Tensor, x: torch.Tensor, top_k_weights: torch.Tensor,
                       where: int | tuple[torch.Tensor, torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
        """One expert on the device from `weights`, weighted and added into out (fp32 [T, H])."""
        if isinstance(where, int):  # one token, this expert at rank `where`
            y = module_expert_ffn(self.module, x, *self.store.weights_args(weights), transposed=self.store.transposed)
            out += y.float() * top_k_weights[:, where:where + 1]
            return out
        tokens, ranks = where
        y = module_expert_ffn(self.module, x[tokens], *self.store.weights_args(weights),
                              transposed=self.store.transposed)
        add_weighted(out, tokens, ranks, y, top_k_weights)
        return out

    def _transfers(self, outcome: PassOutcome, out: torch.Tensor, x: torch.Tensor, top_k_weights: torch.Tensor,
                   where: dict) -> None:
        """The accelerator misses (transfers), double-buffered: each copied on the copy stream into its new
        slot or into one of the two transfer buffers, the copy of the next one queued BEFORE this one's
        compute, so that the copy engine moves transfer i+1 while the compute stream computes transfer i.
        Each compute waits only for its own copy's event. A destination is written only after the compute
        that last read it: an event recorded after that compute, which the copy into it waits for (a
        transfer buffer's across layers and passes, `TransferBuffers.last_read`; a slot's: the hits of this
        pass that read it). Only the last entry of the pass into a slot is copied there (as `_promote`); an
        earlier transfer whose slot a later entry takes is computed from a transfer buffer, so no slot is
        written twice in a pass (the copy queued early would not wait for the compute reading it).
        """
        seam, store, buffers = self._seam, self.store, self.store.transfer
        entered = {entry.expert: entry.slot for entry in outcome.entries}
        last_in_slot = {entry.slot: entry.expert for entry in outcome.entries}
        # (expert, destination, copies): ("slot", s) or ("buffer", b)
        todo = []
        for e in outcome.accelerator_misses:
            slot = entered.get(e)
            if slot is not None and last_in_slot[slot] == e:
                todo.append((e, ("slot", slot), store.slot_copies(e, slot)))
            else:
                b = buffers.take()
                todo.append((e, ("buffer", b), store.scratch_copies(e, b)))
        slots_entered = {dest for _, dest, _ in todo if dest[0] == "slot"}
        read_by_hits = slots_entered & {("slot", s) for s in outcome.hit_slots.values()} if slots_entered else set()
        # a transfer evicts a hit of this very pass: its copy waits for the hits' reads
        hits_read = seam.record(self.index, "read by the hits") if read_by_hits else None

        def issue(i: int) -> object:
            e, dest, pairs = todo[i]
            after = buffers.last_read[dest[1]] if dest[0] == "buffer" else (hits_read if dest in read_by_hits else None)
            event, copied = seam.transfer_copy(self.index, f"transfer {e} into {dest[0]} {dest[1]}", pairs, after)
            self.stats.bytes_to_accelerator += copied
            return event

        copied = issue(0)
        for i, (e, dest, pairs) in enumerate(todo):
            following = issue(i + 1) if i + 1 < len(todo) else None  # queued before this compute
            seam.wait(self.index, copied)
            seam.launch(self.index, f"accelerator miss {e}", self._device_expert, out, x, top_k_weights,
                        where[e], [dst for dst, _ in pairs])
            if dest[0] == "buffer":
                buffers.last_read[dest[1]] = seam.record(self.index, f"read buffer {dest[1]}")
            copied = following

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
