"""Routing traces: which experts each token chose, per MoE layer and forward pass (docs/traces.md; the "Contract:
routing traces").

Two formats are read:
- the moeplan format (written by `run --trace-out`, `trace` and `write_trace`): a header line
  `{"trace": 1, "model", "num_layers", "num_experts", "top_k", "source", ...}`, then one line per
  forward pass `{"pass", "phase", "tokens", "experts": [L][T][k], "weights": [L][T][k] (optional),
  "guesses": [L][ids] (optional)}`; `guesses[l]` are the experts that layer l-1's hidden states guessed
  for layer l in this pass (layer l's router on them, top-k per token, ascending ids; layer 0: []), what
  prefetch (`lookahead: 1`) copies: recorded by `run --trace-out` whether or not prefetch is on;
- the compact format of public recorded traces (`traces/olmoe-1b-7b-decode-299.jsonl`): one decode token a line, `{"tok": N, "layers": [L][k]}`,
  with no header: the model name, expert count and top-k come from the caller or are inferred.

Pure Python (no torch), so that the simulator and the tuner can load traces fast. Every malformation
is a `TraceError` that names the file, the line and what is wrong.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from ..errors import TraceError
from ..textfile import read_bytes
from .fields import FieldChecker

TRACE_VERSION = 1
PHASES = ("prefill", "decode")
SOURCES = ("recorded", "synthetic")
_HEADER_KEYS = ("trace", "model", "num_layers", "num_experts", "top_k", "source")


@dataclass(frozen=True)
class TraceHeader:
    model: str  # model name (informational)
    num_layers: int  # MoE layers, in model order
    num_experts: int  # experts per MoE layer
    top_k: int  # experts each token chooses per layer
    source: str = "recorded"  # recorded | synthetic
    extra: dict[str, Any] = field(default_factory=dict)  # any further header keys (prompts, generator...)


@dataclass(frozen=True)
class TracePass:
    index: int  # pass number (continues across prompts in one file)
    phase: str  # prefill | decode
    tokens: int  # tokens in this forward pass
    experts: tuple[tuple[tuple[int, ...], ...], ...]  # [layer][token][rank] expert ids
    weights: tuple[tuple[tuple[float, ...], ...], ...] | None = None  # same shape: gate weights, or None
    # [layer] the experts guessed for this pass from the previous MoE layer's hidden states, or None
    guesses: tuple[tuple[int, ...], ...] | None = None


@dataclass(frozen=True)
class Trace:
    header: TraceHeader
    passes: tuple[TracePass, ...]

    def decode_passes(self) -> list[TracePass]:
        return [p for p in self.passes if p.phase == "decode"]

    def prefill_passes(self) -> list[TracePass]:
        return [p for p in self.passes if p.phase == "prefill"]

    def tokens_per_expert(self, pass_: TracePass | int, layer: int) -> dict[int, int]:
        """How many of the pass's tokens chose each expert of `layer` (keys: the experts it needs).

        `pass_` is a TracePass of this trace or its position in `passes`. The result is shared: do not
        modify it.
        """
        position = pass_ if isinstance(pass_, int) else self._position[id(pass_)]
        return self._needed[position][layer]

    @cached_property
    def _position(self) -> dict[int, int]:
        return {id(p): i for i, p in enumerate(self.passes)}

    @cached_property
    def _needed(self) -> list[list[dict[int, int]]]:
        # Computed once per trace: the simulator replays the same trace hundreds of times.
        out = []
        for p in self.passes:
            layers = []
            for rows in p.experts:
                counts: dict[int, int] = {}
                for row in rows:
                    for e in row:
                        counts[e] = counts.get(e, 0) + 1
                layers.append(counts)
            out.append(layers)
        return out

    def token_rows(self, layer: int, phases: Iterable[str] = PHASES) -> list[tuple[int, ...]]:
        """Every token's expert ids at `layer`, in trace order, for the passes of `phases`."""
        wanted = set(phases)
        return [row for p in self.passes if p.phase in wanted for row in p.experts[layer]]


# ---- reading ----------------------------------------------------------------------------------------
def load_trace(path: str | Path, *, num_experts: int | None = None, top_k: int | None = None,
               model: str | None = None) -> Trace:
    """Read a trace in the moeplan format or the compact `{"tok", "layers"}` format.

    For the compact format, `num_experts` defaults to the largest id + 1, `top_k` to the row width and
    `model` to the file name; for the moeplan format these arguments, when given, must agree with the
    header.
    """
    p = Path(path)
    rows = list(_read_json_lines(p))
    if not rows:
        raise TraceError(f"{p}: empty trace file (no JSON lines)")
    first_line, first = rows[0]
    if not isinstance(first, dict):
        raise TraceError(f"{p}:{first_line}: expected a JSON object, got {_kind(first)}")
    if "trace" in first:
        trace = _parse_moeplan(p, rows)
        h = trace.header
        for name, given, actual in (("num_experts", num_experts, h.num_experts), ("top_k", top_k, h.top_k)):
            if given is not None and given != actual:
                raise TraceError(f"{p}:{first_line}: header {name} is {actual} but {given} was given")
        return trace
    if "layers" in first or "tok" in first:
        return _parse_shared(p, rows, num_experts=num_experts, top_k=top_k, model=model)
    raise TraceError(f"{p}:{first_line}: neither a moeplan trace header (key 'trace') nor a compact-format "
                     f"row (keys 'tok', 'layers')")


def _read_json_lines(p: Path) -> Iterable[tuple[int, Any]]:
    raw = read_bytes(p, TraceError, "trace file")
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TraceError(f"{p}:{number}: not UTF-8 text (byte {exc.start} of the line)") from None
        if not text.strip():
            continue
        try:
            yield number, json.loads(text)
        except (ValueError, RecursionError) as exc:  # ValueError: JSONDecodeError, or an int too long
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)[:80] or "nested too deeply"
            raise TraceError(f"{p}:{number}: not valid JSON ({msg})") from None


_check = FieldChecker(TraceError, "trace", mapping_word="an object")
_kind = _check.kind


def _int(value: Any, where: str, lo: int = 0) -> int:
    return _check.integer(value, where, lo=lo)


def _parse_header(where: str, data: dict[str, Any]) -> TraceHeader:
    for key in _HEADER_KEYS:
        if key not in data:
            raise TraceError(f"{where}: header is missing key {key!r}")
    version = _int(data["trace"], f"{where}: header trace")
    if version != TRACE_VERSION:
        raise TraceError(f"{where}: header trace: this moeplan reads trace version {TRACE_VERSION}, got {version}")
    if not isinstance(data["model"], str):
        raise TraceError(f"{where}: header model: must be a string, got {_kind(data['model'])}")
    source = data["source"]
    if source not in SOURCES:
        raise TraceError(f"{where}: header source: must be one of {', '.join(SOURCES)}, got {source!r}")
    extra = {k: v for k, v in data.items() if k not in _HEADER_KEYS}
    return TraceHeader(model=data["model"], num_layers=_int(data["num_layers"], f"{where}: header num_layers", 1),
                       num_experts=_int(data["num_experts"], f"{where}: header num_experts", 1),
                       top_k=_int(data["top_k"], f"{where}: header top_k", 1), source=source, extra=extra)


def _parse_moeplan(p: Path, rows: list[tuple[int, Any]]) -> Trace:
    header_line, header_data = rows[0]
    header = _parse_header(f"{p}:{header_line}", header_data)
    if header.top_k > header.num_experts:
        raise TraceError(f"{p}:{header_line}: header top_k {header.top_k} exceeds num_experts {header.num_experts}")
    passes = []
    for number, data in rows[1:]:
        where = f"{p}:{number}"
        if not isinstance(data, dict):
            raise TraceError(f"{where}: expected a JSON object (one forward pass), got {_kind(data)}")
        for key in ("pass", "phase", "tokens", "experts"):
            if key not in data:
                raise TraceError(f"{where}: pass is missing key {key!r}")
        index = _int(data["pass"], f"{where}: pass")
        phase = data["phase"]
        if phase not in PHASES:
            raise TraceError(f"{where}: phase: must be prefill or decode, got {phase!r}"[:200])
        tokens = _int(data["tokens"], f"{where}: tokens", 1)
        experts = _ids_block(data["experts"], where, header, tokens)
        weights = None
        if data.get("weights") is not None:
            weights = _weights_block(data["weights"], where, header.num_layers, tokens, header.top_k)
        guesses = None
        if data.get("guesses") is not None:
            guesses = _guesses_block(data["guesses"], where, header)
        passes.append(TracePass(index, phase, tokens, experts, weights, guesses))
    return Trace(header, tuple(passes))


def _ids_block(block: Any, where: str, header: TraceHeader, tokens: int) -> tuple:
    L, E, k = header.num_layers, header.num_experts, header.top_k
    if not isinstance(block, list) or len(block) != L:
        got = f"{len(block)} entries" if isinstance(block, list) else _kind(block)
        raise TraceError(f"{where}: experts: must be a list of {L} layers, got {got}")
    out = []
    for l, rows in enumerate(block):
        if not isinstance(rows, list) or len(rows) != tokens:
            got = f"{len(rows)} entries" if isinstance(rows, list) else _kind(rows)
            raise TraceError(f"{where}: experts[{l}]: must be a list of {tokens} tokens, got {got}")
        out.append(tuple(_id_row(row, f"{where}: experts[{l}][{t}]", E, k) for t, row in enumerate(rows)))
    return tuple(out)


def _id_row(row: Any, where: str, num_experts: int, top_k: int) -> tuple[int, ...]:
    if not isinstance(row, list) or len(row) != top_k:
        got = f"{len(row)} ids" if isinstance(row, list) else _kind(row)
        raise TraceError(f"{where}: must be a list of {top_k} expert ids, got {got}")
    for e in row:
        if isinstance(e, bool) or not isinstance(e, int):
            raise TraceError(f"{where}: expert id must be an integer, got {_kind(e)} {e!r}"[:200])
        if not 0 <= e < num_experts:
            raise TraceError(f"{where}: expert id {e} out of range 0..{num_experts - 1}")
    if len(set(row)) != len(row):
        raise TraceError(f"{where}: lists an expert twice: {row}")
    return tuple(row)


def _guesses_block(block: Any, where: str, header: TraceHeader) -> tuple:
    L, E = header.num_layers, header.num_experts
    if not isinstance(block, list) or len(block) != L:
        got = f"{len(block)} entries" if isinstance(block, list) else _kind(block)
        raise TraceError(f"{where}: guesses: must be a list of {L} layers, got {got}")
    out = []
    for l, ids in enumerate(block):
        if not isinstance(ids, list):
            raise TraceError(f"{where}: guesses[{l}]: must be a list of expert ids, got {_kind(ids)}")
        for e in ids:
            if isinstance(e, bool) or not isinstance(e, int) or not 0 <= e < E:
                raise TraceError(f"{where}: guesses[{l}]: expert ids must be integers in 0..{E - 1}, got {e!r}"[:200])
        if len(set(ids)) != len(ids):
            raise TraceError(f"{where}: guesses[{l}]: lists an expert twice: {ids}"[:200])
        out.append(tuple(sorted(ids)))
    return tuple(out)


def _weights_block(block: Any, where: str, L: int, tokens: int, k: int) -> tuple:
    if not isinstance(block, list) or len(block) != L:
        raise TraceError(f"{where}: weights: must be a list of {L} layers like experts")
    out = []
    for l, rows in enumerate(block):
        if not isinstance(rows, list) or len(rows) != tokens:
            raise TraceError(f"{where}: weights[{l}]: must be a list of {tokens} tokens like experts")
        layer = []
        for t, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != k:
                raise TraceError(f"{where}: weights[{l}][{t}]: must be a list of {k} numbers like experts")
            for w in row:
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                    raise TraceError(f"{where}: weights[{l}][{t}]: must hold finite numbers, got {w!r}"[:200])
            layer.append(tuple(float(w) for w in row))
        out.append(tuple(layer))
    return tuple(out)


def _parse_shared(p: Path, rows: list[tuple[int, Any]], *, num_experts: int | None, top_k: int | None,
                  model: str | None) -> Trace:
    tables = []
    for number, data in rows:
        where = f"{p}:{number}"
        if not isinstance(data, dict):
            raise TraceError(f"{where}: expected a JSON object {{\"tok\", \"layers\"}}, got {_kind(data)}")
        for key in ("tok", "layers"):
            if key not in data:
                raise TraceError(f"{where}: row is missing key {key!r}")
        tok = _int(data["tok"], f"{where}: tok")
        layers = data["layers"]
        if not isinstance(layers, list) or not layers:
            raise TraceError(f"{where}: layers: must be a non-empty list of expert-id lists, got {_kind(layers)}")
        tables.append((number, tok, layers))
    first_number, _, first_layers = tables[0]
    num_layers = len(first_layers)
    if top_k is None:
        row0 = first_layers[0]
        if not isinstance(row0, list) or not row0:
            raise TraceError(f"{p}:{first_number}: layers[0]: must be a non-empty list of expert ids")
        top_k = len(row0)
    if num_experts is None:
        # Infer the expert count from the ids; ids are validated below, so skip non-integers here.
        ids = [e for _, _, layers in tables for row in layers if isinstance(row, list) for e in row
               if isinstance(e, int) and not isinstance(e, bool)]
        num_experts = max(ids) + 1 if ids else 1
    header = TraceHeader(model=model if model is not None else p.stem, num_layers=num_layers,
                         num_experts=num_experts, top_k=top_k, source="recorded",
                         extra={"format": "compact", "file": p.name})
    passes = []
    for number, tok, layers in tables:
        where = f"{p}:{number}"
        if len(layers) != num_layers:
            raise TraceError(f"{where}: layers: has {len(layers)} layers but line {first_number} has {num_layers}")
        experts = tuple((_id_row(row, f"{where}: layers[{l}]", num_experts, top_k),) for l, row in enumerate(layers))
        passes.append(TracePass(tok, "decode", 1, experts, None))
    return Trace(header, tuple(passes))


# ---- writing ----------------------------------------------------------------------------------------
def trace_to_jsonl(trace: Trace) -> str:
    h = trace.header
    head = header_record(h.model, h.num_layers, h.num_experts, h.top_k, h.source, **h.extra)
    passes = (pass_record(p.index, p.phase, p.tokens, [[list(r) for r in layer] for layer in p.experts],
                          None if p.weights is None else [[list(r) for r in layer] for layer in p.weights],
                          None if p.guesses is None else [list(g) for g in p.guesses])
              for p in trace.passes)
    return records_to_jsonl(head, passes)


def write_trace(path: str | Path, trace: Trace) -> Path:
    """Write `trace` in the moeplan format, atomically."""
    return write_atomic(path, trace_to_jsonl(trace))


# ---- recording, line by line ------------------------------------------------------------------------
def header_record(model: str, num_layers: int, num_experts: int, top_k: int, source: str = "recorded",
                  **extra: Any) -> dict[str, Any]:
    """A trace's header line in the moeplan format; `extra` adds the optional keys (prompt, dtype, date...)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    return {"trace": TRACE_VERSION, "model": model, "num_layers": num_layers, "num_experts": num_experts,
            "top_k": top_k, "source": source, **extra}


def pass_record(index: int, phase: str, tokens: int, experts: list, weights: list | None = None,
                guesses: list | None = None) -> dict[str, Any]:
    """One forward pass's line: experts [L][T][k] ids, weights the same shape or None (left out), guesses
    [L][ids] or None (left out)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    record: dict[str, Any] = {"pass": index, "phase": phase, "tokens": tokens, "experts": experts}
    if weights is not None:
        record["weights"] = weights
    if guesses is not None:
        record["guesses"] = guesses
    return record


def records_to_jsonl(header: dict[str, Any], passes: Iterable[dict[str, Any]]) -> str:
    """The header line and the pass lines as JSON Lines text (compact separators: traces run long)."""
    lines = [json.dumps(header, separators=(",", ":"))]
    lines += [json.dumps(p, separators=(",", ":")) for p in passes]
    return "\n".join(lines) + "\n"


def write_records(path: str | Path, header: dict[str, Any], passes: Iterable[dict[str, Any]]) -> Path:
    """Write a header record and pass records (`header_record`, `pass_record`) as a trace file, atomically."""
    return write_atomic(path, records_to_jsonl(header, passes))


class TraceRecorder:
    """The passes of a run being recorded: each pass begins empty, and each MoE layer fills in its routing
    as it runs (`run --trace-out`). Layers that a pass does not reach stay null, which the reader rejects:
    a model runs every MoE layer on every pass."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.passes: list[dict[str, Any]] = []

    def begin_pass(self, index: int, phase: str, tokens: int) -> None:
        # guesses: layer 0 has no previous layer to guess from; the others fill in as layers run
        self.passes.append(pass_record(index, phase, tokens, [None] * self.num_layers, [None] * self.num_layers,
                                       [[]] + [None] * (self.num_layers - 1)))

    def record(self, layer: int, experts: list[list[int]], weights: list[list[float]]) -> None:
        """The current pass's routing at `layer`: [T][k] expert ids in rank order and their gate weights."""
        record = self.passes[-1]
        record["experts"][layer] = experts
        # six decimals: the planner reads weights as statistics, and a full float triples a trace's size
        record["weights"][layer] = [[round(w, 6) for w in row] for row in weights]

    def record_guesses(self, layer: int, guesses: Iterable[int]) -> None:
        """The experts guessed for `layer` in the current pass, from the previous layer's hidden states."""
        self.passes[-1]["guesses"][layer] = sorted(guesses)

    def write(self, path: str | Path, header: dict[str, Any]) -> Path:
        for record in self.passes:  # a layer without a router to guess with leaves a pass without guesses
            if None in record["guesses"]:
                del record["guesses"]
        return write_records(path, header, self.passes)
