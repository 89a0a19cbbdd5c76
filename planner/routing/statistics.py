"""Routing statistics of a trace, per MoE layer: what decides how well an expert cache can work.

- skew: share of all token selections taken by the most popular 10% of experts (ceil(E/10) of them, as
  bench/diagnostics/routing_stats_tiny.py counts); uniform routing gives about ceil(E/10)/E.
- next-token reuse: for each token after the first of a sequence, the share of its k experts that the
  previous token also chose (uniform routing: about k/E). A prefill pass starts a new sequence.
- second-token reuse: the same, against the token two before (uniform: about k/E). A chain that only
  remembers the previous token lets it fall towards the popularity baseline; recorded routing can keep
  more (the embedded model's trace: 0.73 at distance 2 against 0.55 at distance 1, a cache of two tokens'
  experts sees it).
- cross-layer reuse (layer l): share of a token's k expert ids at layer l+1 equal to an id it chose at
  layer l. Experts of different layers are different weights, so this is only a correlation of router
  ids (useful for "guess the same ids" prefetch heuristics), never cache reuse. Uniform: about k/E.
- working set: distinct experts over every window of `window` consecutive tokens (mean), and over the
  whole trace.
- popularity: every expert's share of the selections, sorted (the shape behind the skew, without ids).
- reuse by popularity: next-token reuse split by how popular the expert is: the experts sorted by their
  share of the selections and cut into POPULARITY_GROUPS equal groups (most popular first); per group, the
  share of its selections at token t that token t+1 chose again. Recorded routing keeps its popular
  experts far longer than its rare ones (OLMoE: about 0.58 in the top quarter against 0.13 in the bottom
  one, for a mean of 0.43), which one reuse figure cannot tell from "every expert kept alike": a cache
  holds the sticky popular experts either way, but a rare expert that stays a second token is a hit only
  in the second case (bench/results/routing_calibration.md).
- first-choice repetition: share of consecutive token pairs whose first choice (rank 0) is the same
  expert (uniform: 1/E); and first-or-second repetition: share of pairs whose first two choices share an
  expert (uniform, top-2 of 8: 1 - 6/8 * 5/7, about 0.46). These are the Mixtral paper's Table 5 figures
  (Jiang et al. 2024, "expert assignment repetitions"). Both need the router's rank order (first choice
  first): a trace keeps it when its passes carry gate weights (what `run --trace-out` records, in
  descending order) or its header says `"rank_order": true` (synthetic traces); otherwise (the OLMoE
  trace, whose ids are sorted) they are None, except first-or-second for top-2, which is a set statistic.
Pure Python; the numbers are means over tokens of the selected phases. This one function measures recorded
and synthetic traces alike.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from runtime.contracts.traces import PHASES, Trace

WINDOW = 16
POPULARITY_GROUPS = 4


@dataclass(frozen=True)
class LayerStats:
    layer: int
    selections: int  # token-expert choices counted
    skew: float  # share of selections taken by the top 10% of experts
    next_token_reuse: float  # mean share of a token's experts also chosen by the previous token
    cross_layer_reuse: float | None  # mean share of ids at layer+1 equal to ids at this layer; None at the last layer
    working_set_window: float  # mean distinct experts over windows of `window` tokens
    working_set_total: int  # distinct experts over the whole trace
    first_choice_repeat: float | None = None  # share of consecutive pairs with the same first choice
    first_or_second_repeat: float | None = None  # share of consecutive pairs whose top-2 share an expert
    popularity: tuple[float, ...] = ()  # every expert's share of the selections, largest first (no ids)
    second_token_reuse: float | None = None  # mean share of a token's experts chosen by the token two before
    # per popularity group (most popular first): share of its selections that the next token chose again
    reuse_by_popularity: tuple[float | None, ...] = ()


@dataclass(frozen=True)
class TraceStats:
    model: str
    source: str
    num_layers: int
    num_experts: int
    top_k: int
    tokens: int
    window: int
    layers: tuple[LayerStats, ...]

    @property
    def mean_skew(self) -> float:
        return _avg([s.skew for s in self.layers])

    @property
    def mean_next_token_reuse(self) -> float:
        return _avg([s.next_token_reuse for s in self.layers])

    @property
    def mean_cross_layer_reuse(self) -> float:
        return _avg([s.cross_layer_reuse for s in self.layers if s.cross_layer_reuse is not None])

    @property
    def mean_first_choice_repeat(self) -> float | None:
        values = [s.first_choice_repeat for s in self.layers]
        return None if any(v is None for v in values) else _avg(values)

    @property
    def mean_first_or_second_repeat(self) -> float | None:
        values = [s.first_or_second_repeat for s in self.layers]
        return None if any(v is None for v in values) else _avg(values)

    @property
    def mean_working_set_window(self) -> float:
        return _avg([s.working_set_window for s in self.layers])

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"] = [asdict(s) for s in self.layers]
        out["mean"] = {"skew": self.mean_skew, "next_token_reuse": self.mean_next_token_reuse,
                       "cross_layer_reuse": self.mean_cross_layer_reuse,
                       "working_set_window": self.mean_working_set_window,
                       "first_choice_repeat": self.mean_first_choice_repeat,
                       "first_or_second_repeat": self.mean_first_or_second_repeat}
        return out


def _avg(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def odds(p: float) -> float:
    """p / (1 - p), with p held within [0.02, 0.98]: how the routing calibration compares reuse rates."""
    p = min(0.98, max(0.02, p))
    return p / (1 - p)


def top_share(counts: Sequence[int], fraction: float = 0.1) -> float:
    """Share of the total held by the largest ceil(fraction * len(counts)) entries."""
    total = sum(counts)
    if total == 0:
        return 0.0
    n = max(1, math.ceil(fraction * len(counts) - 1e-9))
    return sum(sorted(counts, reverse=True)[:n]) / total


def sequences(trace: Trace, phases: Sequence[str] = PHASES) -> list[list[int]]:
    """Positions of the selected passes, split into sequences: a prefill pass starts a new one."""
    wanted = set(phases)
    out: list[list[int]] = []
    for i, p in enumerate(trace.passes):
        if p.phase not in wanted:
            continue
        if not out or p.phase == "prefill":
            out.append([])
        out[-1].append(i)
    return out


def next_token_reuse(rows: Sequence[Sequence[int]], top_k: int, distance: int = 1) -> list[float]:
    """Per token after the first `distance`, the share of its experts the token `distance` before also chose."""
    return [len(set(a) & set(b)) / top_k for a, b in zip(rows, rows[distance:])]


def reuse_by_popularity(seqs: Sequence[Sequence[Sequence[int]]], counts: Sequence[int],
                        groups: int = POPULARITY_GROUPS) -> tuple[float | None, ...]:
    """Per group of experts by popularity (`counts` sorted, cut into `groups` equal groups, most popular
    first; ties in id order): the share of the group's selections at token t (not a sequence's last) that
    token t+1 also chose. None for a group never chosen before a next token."""
    E = len(counts)
    order = sorted(range(E), key=lambda e: (-counts[e], e))
    group = {e: i * groups // E for i, e in enumerate(order)}
    kept, seen = [0] * groups, [0] * groups
    for rows in seqs:
        for a, b in zip(rows, rows[1:]):
            nxt = set(b)
            for e in a:
                seen[group[e]] += 1
                kept[group[e]] += e in nxt
    return tuple(kept[g] / seen[g] if seen[g] else None for g in range(groups))


def has_rank_order(trace: Trace) -> bool:
    """Whether each token's ids are in the router's rank order (first choice first): the header says so, or
    every pass carries gate weights, recorded in descending order with the ids."""
    if trace.header.extra.get("rank_order") is True:
        return True
    return bool(trace.passes) and all(p.weights is not None for p in trace.passes)


def repeat_rates(rows: Sequence[Sequence[int]], top_k: int, ranked: bool) -> tuple[list[int], list[int]]:
    """Per consecutive pair of token rows: 1 if the first choice repeats, and 1 if the first two choices share
    an expert ([] where the rank order is needed and unknown)."""
    pairs = list(zip(rows, rows[1:]))
    first = [int(a[0] == b[0]) for a, b in pairs] if ranked else []
    either = [int(bool(set(a[:2]) & set(b[:2]))) for a, b in pairs] if (ranked or top_k == 2) else []
    return first, either


def trace_stats(trace: Trace, phases: Sequence[str] = PHASES, window: int = WINDOW) -> TraceStats:
    if window < 1:
        raise ValueError(f"window: must be >= 1, got {window}")
    h = trace.header
    seqs = sequences(trace, phases)
    # rows[l][s]: token rows of sequence s at layer l, in order
    rows = [[[r for i in seq for r in trace.passes[i].experts[l]] for seq in seqs] for l in range(h.num_layers)]
    tokens = sum(len(s) for s in rows[0]) if rows else 0
    ranked = has_rank_order(trace)
    layers = []
    for l in range(h.num_layers):
        counts = [0] * h.num_experts
        for seq in rows[l]:
            for row in seq:
                for e in row:
                    counts[e] += 1
        reuse = [x for seq in rows[l] for x in next_token_reuse(seq, h.top_k)]
        reuse2 = [x for seq in rows[l] for x in next_token_reuse(seq, h.top_k, 2)]
        cross = None
        if l + 1 < h.num_layers:
            cross = _avg([len(set(a) & set(b)) / h.top_k
                          for sa, sb in zip(rows[l], rows[l + 1]) for a, b in zip(sa, sb)])
        windows = [w for seq in rows[l] for w in _window_sizes(seq, window)]
        first: list[int] = []
        either: list[int] = []
        for seq in rows[l]:
            f, e = repeat_rates(seq, h.top_k, ranked)
            first += f
            either += e
        pairs = sum(max(0, len(seq) - 1) for seq in rows[l])
        layers.append(LayerStats(layer=l, selections=sum(counts), skew=top_share(counts),
                                 next_token_reuse=_avg(reuse), cross_layer_reuse=cross,
                                 working_set_window=_avg(windows),
                                 working_set_total=sum(1 for c in counts if c),
                                 first_choice_repeat=_avg(first) if ranked and pairs else None,
                                 first_or_second_repeat=_avg(either) if (ranked or h.top_k == 2) and pairs
                                 and h.top_k >= 2 else None,
                                 popularity=tuple(c / max(1, sum(counts)) for c in sorted(counts, reverse=True)),
                                 second_token_reuse=_avg(reuse2) if reuse2 else None,
                                 reuse_by_popularity=reuse_by_popularity(rows[l], counts)))
    return TraceStats(model=h.model, source=h.source, num_layers=h.num_layers, num_experts=h.num_experts,
                      top_k=h.top_k, tokens=tokens, window=window, layers=tuple(layers))


def _window_sizes(rows: Sequence[Sequence[int]], window: int) -> list[int]:
    """Distinct experts in every run of `window` consecutive tokens (one run if the sequence is shorter)."""
    if not rows:
        return []
    if len(rows) <= window:
        return [len({e for r in rows for e in r})]
    live: dict[int, int] = {}
    sizes = []
    for t, row in enumerate(rows):
        for e in row:
            live[e] = live.get(e, 0) + 1
        if t >= window:
            for e in rows[t - window]:
                live[e] -= 1
                if not live[e]:
                    del live[e]
        if t >= window - 1:
            sizes.append(len(live))
    return sizes


def format_table(stats: TraceStats) -> str:
    lines = [f"{stats.model} ({stats.source}): {stats.num_layers} MoE layers, {stats.num_experts} experts, "
             f"top-{stats.top_k}, {stats.tokens} tokens",
             f"{'layer':>5} {'skew top10%':>11} {'next-token':>10} {'cross-layer':>11} "
             f"{'ws/' + str(stats.window) + ' tok':>9} {'ws total':>8} {'1st rep':>7} {'1st|2nd':>7}"]
    for s in stats.layers:
        cross = "-" if s.cross_layer_reuse is None else f"{s.cross_layer_reuse:.3f}"
        lines.append(f"{s.layer:>5} {s.skew:>11.3f} {s.next_token_reuse:>10.3f} {cross:>11} "
                     f"{s.working_set_window:>9.1f} {s.working_set_total:>8} {_opt(s.first_choice_repeat):>7} "
                     f"{_opt(s.first_or_second_repeat):>7}")
    lines.append(f"{'mean':>5} {stats.mean_skew:>11.3f} {stats.mean_next_token_reuse:>10.3f} "
                 f"{stats.mean_cross_layer_reuse:>11.3f} {stats.mean_working_set_window:>9.1f} {'':>8} "
                 f"{_opt(stats.mean_first_choice_repeat):>7} {_opt(stats.mean_first_or_second_repeat):>7}")
    return "\n".join(lines)


def _opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@dataclass(frozen=True)
class GuessAccuracy:
    """How often prefetch guessed a needed expert, measured on a trace's recorded guesses: overall, and per
    MoE layer and rank (the expert's best rank among the pass's tokens that chose it, 0 = top-1).

    Both splits matter where few experts are cached: a layer whose previous layer's hidden states predict it
    well gains much more than one that is guessed at random, and a token's top-1 expert is guessed far more
    often than its last choice (on the embedded model's trace: layer 1 at 0.53, layers 2 and 3 at 0.85 and
    0.80; rank 0 at 0.84, rank 1 at 0.62). One accuracy for every expert under-predicted prefetch's gain
    with one slot per layer by 15 % (bench/results/prefetch_predict.md)."""

    overall: float
    by_layer_rank: tuple[tuple[float, ...], ...]  # [layer][rank]; layer 0 (never guessed) is empty

    def of(self, layer: int, rank: int) -> float:
        """The accuracy for a needed expert of `layer` at `rank`; the overall one where the trace had none."""
        row = self.by_layer_rank[layer] if layer < len(self.by_layer_rank) else ()
        return row[rank] if rank < len(row) else self.overall


def best_ranks(trace: Trace, position: int, layer: int) -> dict[int, int]:
    """Each expert the pass needs at `layer`, with its best (lowest) rank among the tokens that chose it."""
    ranks: dict[int, int] = {}
    for row in trace.passes[position].experts[layer]:
        for rank, e in enumerate(row):
            if rank < ranks.get(e, rank + 1):
                ranks[e] = rank
    return ranks


def measure_guess_accuracy(trace: Trace, phases: Sequence[str] = PHASES) -> GuessAccuracy | None:
    """The share of needed experts that prefetch guessed, over the passes of `phases` that recorded guesses
    and the MoE layers after the first (layer 0 has no previous layer to guess from): overall and per layer
    and rank (a cell with no needed expert takes the overall share). None where the trace recorded no
    guesses."""
    wanted = set(phases)
    L, k = trace.header.num_layers, trace.header.top_k
    needed = [[0] * k for _ in range(L)]
    right = [[0] * k for _ in range(L)]
    for position, p in enumerate(trace.passes):
        if p.phase not in wanted or p.guesses is None:
            continue
        for l in range(1, L):
            guessed = p.guesses[l]
            for e, rank in best_ranks(trace, position, l).items():
                needed[l][rank] += 1
                right[l][rank] += e in guessed
    total = sum(map(sum, needed))
    if not total:
        return None
    overall = sum(map(sum, right)) / total
    table = tuple(() if l == 0 else tuple(right[l][r] / needed[l][r] if needed[l][r] else overall for r in range(k))
                  for l in range(L))
    return GuessAccuracy(overall, table)


def guess_accuracy(trace: Trace, phases: Sequence[str] = PHASES) -> float | None:
    """The overall share of needed experts that prefetch guessed (`measure_guess_accuracy`), or None."""
    measured = measure_guess_accuracy(trace, phases)
    return None if measured is None else measured.overall
