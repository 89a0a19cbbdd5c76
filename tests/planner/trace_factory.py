"""Small hand-made traces for the planner tests."""
from __future__ import annotations

from planner.paths import TRACES
from runtime.contracts.traces import Trace, TraceHeader, TracePass

# The real OLMoE decode trace shipped in traces/ (traces/README.md gives its source and license).
OLMOE = TRACES / "olmoe-1b-7b-decode-299.jsonl"


def make_trace(passes: list[tuple[str, list[list[list[int]]]]], num_experts: int, top_k: int) -> Trace:
    """passes: (phase, experts[layer][token][rank]) each; the layer count is taken from the first pass."""
    num_layers = len(passes[0][1])
    built = tuple(TracePass(i, phase, len(layers[0]), tuple(tuple(tuple(r) for r in rows) for rows in layers))
                  for i, (phase, layers) in enumerate(passes))
    return Trace(TraceHeader("test", num_layers, num_experts, top_k, "recorded"), built)


def decode_sequence(ids: list[int], num_experts: int) -> Trace:
    """One layer, top-1, one decode token per pass choosing ids[t]."""
    return make_trace([("decode", [[[e]]]) for e in ids], num_experts, 1)
