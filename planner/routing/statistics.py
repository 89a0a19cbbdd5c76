"""Routing statistics of a trace, per MoE layer: what decides how well an expert cache can work.

- skew: share of all token selections taken by the most popular 10% of experts (ceil(E/10) of them, as
  bench/diagnostics/routing_stats_tiny.py counts); uniform routing gives about ceil(E/10)/E.
- next-token reuse: for each token after the first of a sequence, the share of its k experts that the
  previous token also chose (uniform routing: about k/E). A prefill pass starts a new sequence.
- cross-layer reuse (layer l): share of a token's k expert ids at layer l+1 equal to an id it chose at
  layer l. Experts of different layers are different weights, so this is only a correlation of router
  ids (useful for "guess the same ids" prefetch heuristics), never cache reuse. Uniform: about k/E.
- working set: distinct experts over every window of `window` consecutive tokens (mean), and over the
  whole trace.
Pure Python; the numbers are means over tokens of the selected phases.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from runtime.contracts.traces import PHASES, Trace

WINDOW = 16


@dataclass(frozen=True)
class LayerStats:
    layer: int
    selections: int  # token-expert choices counted
    skew: float  # share of selections taken by the top 10% of experts
    next_token_reuse: float  # mean share of a token's experts also chosen by the previous token
    cross_layer_reuse: float | None  # mean share of ids at layer+1 equal to ids at this layer; None at the last layer
    working_set_window: float  # mean distinct experts over windows of `window` tokens
    working_set_total: int  # distinct experts over the whole trace


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
    def mean_working_set_window(self) -> float:
        return _avg([s.working_set_window for s in self.layers])

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layers"] = [asdict(s) for s in self.layers]
        out["mean"] = {"skew": self.mean_skew, "next_token_reuse": self.mean_next_token_reuse,
                       "cross_layer_reuse": self.mean_cross_layer_reuse,
                       "working_set_window": self.mean_working_set_window}
        return out


def _avg(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


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


def next_token_reuse(rows: Sequence[Sequence[int]], top_k: int) -> list[float]:
    """Per token after the first, the share of its experts the previous token also chose."""
    return [len(set(a) & set(b)) / top_k for a, b in zip(rows, rows[1:])]


def trace_stats(trace: Trace, phases: Sequence[str] = PHASES, window: int = WINDOW) -> TraceStats:
    if window < 1:
        raise ValueError(f"window: must be >= 1, got {window}")
    h = trace.header
    seqs = sequences(trace, phases)
    # rows[l][s]: token rows of sequence s at layer l, in order
    rows = [[[r for i in seq for r in trace.passes[i].experts[l]] for seq in seqs] for l in range(h.num_layers)]
    tokens = sum(len(s) for s in rows[0]) if rows else 0
    layers = []
    for l in range(h.num_layers):
        counts = [0] * h.num_experts
        for seq in rows[l]:
            for row in seq:
                for e in row:
                    counts[e] += 1
        reuse = [x for seq in rows[l] for x in next_token_reuse(seq, h.top_k)]
        cross = None
        if l + 1 < h.num_layers:
            cross = _avg([len(set(a) & set(b)) / h.top_k
                          for sa, sb in zip(rows[l], rows[l + 1]) for a, b in zip(sa, sb)])
        windows = [w for seq in rows[l] for w in _window_sizes(seq, window)]
        layers.append(LayerStats(layer=l, selections=sum(counts), skew=top_share(counts),
                                 next_token_reuse=_avg(reuse), cross_layer_reuse=cross,
                                 working_set_window=_avg(windows),
                                 working_set_total=sum(1 for c in counts if c)))
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
             f"{'ws/' + str(stats.window) + ' tok':>9} {'ws total':>8}"]
    for s in stats.layers:
        cross = "-" if s.cross_layer_reuse is None else f"{s.cross_layer_reuse:.3f}"
        lines.append(f"{s.layer:>5} {s.skew:>11.3f} {s.next_token_reuse:>10.3f} {cross:>11} "
                     f"{s.working_set_window:>9.1f} {s.working_set_total:>8}")
    lines.append(f"{'mean':>5} {stats.mean_skew:>11.3f} {stats.mean_next_token_reuse:>10.3f} "
                 f"{stats.mean_cross_layer_reuse:>11.3f} {stats.mean_working_set_window:>9.1f}")
    return "\n".join(lines)


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
