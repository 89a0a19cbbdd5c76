"""What `explain` (and the tuner) predict for: the model shape, the routing trace, and its cache replay.

Pure Python. It picks the model (`--model`, else the plan's model.path folder, else its catalog name),
the trace (given, else the model's recorded trace, else a synthetic one fitted to the recorded OLMoE
trace and rescaled to the model), adds a prefill pass when the trace has none, and replays the trace
through the simulator under the plan.
"""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from runtime.contracts.model_shape import ModelShape
from runtime.contracts.traces import Trace, TracePass, load_trace
from runtime.errors import ModelError, TraceError
from runtime.plan import Plan

from ..catalog import load_model_shape
from ..paths import TRACES, shown
from .statistics import GuessAccuracy, measure_guess_accuracy

# The recorded trace that synthetic traces are fitted to, and the model it was recorded from (traces/README.md).
RECORDED_MODEL = "olmoe-1b-7b"
RECORDED_FILE = "olmoe-1b-7b-decode-299.jsonl"
SYNTHETIC_DECODE_TOKENS = 256  # decode passes of a synthetic trace: enough for hit rates to settle


def resolve_model(plan: Plan, model: str | None) -> ModelShape:
    """`model` (catalog name or folder), else the plan's model.path if it is a folder, else model.name."""
    dtype, experts = plan.model.dtype, plan.model.experts
    if model:
        return load_model_shape(model, dtype, experts)
    if plan.model.path and Path(plan.model.path).expanduser().is_dir():
        return load_model_shape(plan.model.path, dtype, experts)
    if plan.model.name:
        return load_model_shape(plan.model.name, dtype, experts)
    raise ModelError("model: the plan names no model (model.name, model.path) and no --model was given")


def recorded_trace_path(shape: ModelShape, traces: Path) -> Path | None:
    """The recorded trace of this model: <traces>/<name>*.jsonl, the first by name, or None."""
    found = sorted(traces.glob(f"{shape.name}*.jsonl")) if traces.is_dir() else []
    return found[0] if found else None


def resolve_trace(shape: ModelShape, trace: str | None, prompt_tokens: int, seed: int = 0,
                  traces: Path = TRACES) -> tuple[Trace, str]:
    """The trace to replay and a sentence saying where it came from; a prefill pass is added if missing.

    `traces` is the folder of recorded traces (the project's `traces/`)."""
    if trace is not None:
        t = load_trace(trace, num_experts=shape.num_experts, top_k=shape.top_k, model=shape.name)
        source = f"{trace} ({t.header.source})"
    elif (path := recorded_trace_path(shape, traces)) is not None:
        t = load_trace(path, num_experts=shape.num_experts, top_k=shape.top_k, model=shape.name)
        source = f"{shown(path)} (recorded)"
    else:
        t, source = synthetic_trace(shape, traces, seed)
    if t.header.num_layers != shape.num_moe_layers or t.header.num_experts != shape.num_experts:
        raise TraceError(f"{source}: has {t.header.num_layers} MoE layers of {t.header.num_experts} experts "
                         f"but model {shape.name} has {shape.num_moe_layers} of {shape.num_experts}")
    if not t.prefill_passes():
        t = with_prefill(t, prompt_tokens, seed)
        source += f"; prefill of {prompt_tokens} tokens drawn from its expert popularity"
    return t, source


def synthetic_trace(shape: ModelShape, traces: Path, seed: int) -> tuple[Trace, str]:
    """Routing statistics fitted to the recorded OLMoE trace, rescaled to this model's layers and experts."""
    from .synthetic import fit_routing_stats, synthesize

    fitted_to = traces / RECORDED_FILE
    if not fitted_to.is_file():
        raise TraceError(f"{shown(fitted_to)}: missing, and model {shape.name} has no recorded trace: pass --trace FILE")
    recorded = load_trace(fitted_to, model=RECORDED_MODEL)
    stats = fit_routing_stats(recorded)
    t = synthesize(stats, num_layers=shape.num_moe_layers, num_experts=shape.num_experts, top_k=shape.top_k,
                   tokens=SYNTHETIC_DECODE_TOKENS, seed=seed)
    return t, (f"synthetic: {SYNTHETIC_DECODE_TOKENS} decode tokens fitted to {fitted_to.name} and rescaled to "
               f"{shape.num_moe_layers} layers x {shape.num_experts} experts, top-{shape.top_k}, seed {seed}")


def with_prefill(trace: Trace, tokens: int, seed: int = 0) -> Trace:
    """`trace` with one prefill pass of `tokens` tokens in front.

    Each token picks top_k distinct experts per layer, drawn independently with the popularity the
    trace's passes show for that layer (random.Random(seed)): a prompt's tokens are spread over the
    experts the way the workload spreads them, without the decode order.
    """
    h = trace.header
    rng = random.Random(seed)
    layers = []
    for layer in range(h.num_layers):
        weights = [1.0] * h.num_experts  # one pseudo-count each, so that no expert is impossible
        for row in trace.token_rows(layer):
            for e in row:
                weights[e] += 1.0
        rows = []
        for _ in range(tokens):
            rows.append(tuple(sorted(_draw_distinct(rng, weights, h.top_k))))
        layers.append(tuple(rows))
    prefill = TracePass(index=0, phase="prefill", tokens=tokens, experts=tuple(layers))
    shifted = tuple(replace(p, index=p.index + 1) for p in trace.passes)
    return Trace(header=h, passes=(prefill, *shifted))


def _draw_distinct(rng: random.Random, weights: list[float], k: int) -> list[int]:
    chosen: list[int] = []
    w = list(weights)
    for _ in range(k):
        e = rng.choices(range(len(w)), weights=w)[0]
        chosen.append(e)
        w[e] = 0.0
    return chosen


# Where a trace recorded no prefetch guesses (a public or synthetic trace), prefetch is predicted to guess
# nothing right: what prefetch gains is then never counted, so `tune` picks it only on a trace that shows it.
ASSUMED_PREFETCH_ACCURACY = 0.0


def prefetch_accuracy(trace: Trace) -> tuple[float | GuessAccuracy, str]:
    """The guess accuracy the cost model predicts prefetch with (measured per layer and rank where the trace
    recorded guesses: `GuessAccuracy`), and where it came from."""
    measured = measure_guess_accuracy(trace)
    if measured is None:
        return ASSUMED_PREFETCH_ACCURACY, (f"{ASSUMED_PREFETCH_ACCURACY:.2f}, assumed: the trace recorded no "
                                           f"guesses (record one with `moeplan run --trace-out`)")
    return measured, (f"{measured.overall:.3f}, measured on the trace's recorded guesses (per layer and rank "
                      f"in the replay)")


def overall_accuracy(accuracy: float | GuessAccuracy) -> float:
    """One number for a report: the accuracy itself, or a measured one's overall share."""
    return accuracy.overall if isinstance(accuracy, GuessAccuracy) else accuracy


def replay(trace: Trace, plan: Plan, shape: ModelShape, accuracy: float | GuessAccuracy | None = None):
    """The simulator's replay of `trace` under the plan's cache and miss rules; prefetch is statistical,
    with guess accuracy `accuracy` (None: the trace's, `prefetch_accuracy`)."""
    from .simulator import simulate

    L, E = shape.num_moe_layers, shape.num_experts
    rule = plan.miss.rule
    return simulate(trace, plan.cache.slots_per_layer(L, E), plan.cache.policy, plan.cache.preload_per_layer(L, E),
                    rule, lookahead=plan.prefetch.lookahead,
                    prefetch_accuracy=prefetch_accuracy(trace)[0] if accuracy is None else accuracy)
