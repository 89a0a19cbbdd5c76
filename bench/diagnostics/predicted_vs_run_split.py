"""Where a CPU decode token's time goes in the runtime, against the pieces the cost model adds up.

In one process, round after round: the runtime generates with an all-CPU plan without slots (`moeplan
run`'s path, no text streamed), each decoder layer timed in place (through the native decode step's seam
where it runs), so that each token splits into its layers and the rest (the generation loop, embedding,
final norm, lm_head, the token pick); then the profiler's own timings of the same shape, as `moeplan
profile` takes them, warm where a token's bytes fit the last-level cache and cold otherwise (the cost
model's choice): the dense part of one layer (`DenseLayerBench`, with what runs in between as its
flush: the MoE layer's experts), the MoE layer's fused one-token call (`MoeLayerBench`, `token` path) and
the decode step outside the layers: `DecodeStepBench` as it is now (the runtime's generation loop around
one real layer whose time is taken off) and as it was before 2026-12-07 (`OldDecodeStepBench` below:
transformers' forward and the sampler in a loop of its own, around a layer that only grows the KV cache),
and the layer's own time inside the runtime's loop (`cpu.decode_layer`). The cost model's decode token
was layers x (dense + MoE) + step before, and is now layers x max(MoE, the layer in the loop) + step.

Per round it reports the fastest and the median token, both sides; the table gives the median over
rounds. On a shared machine the fastest tokens describe the host, the medians the load of the moment.

    .venv/bin/python bench/diagnostics/predicted_vs_run_split.py [--model models/tiny-moe] [--threads 1] [--rounds 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from planner.catalog import load_model_shape  # noqa: E402
from planner.cost_model import decode_bytes  # noqa: E402
from planner.profile.measure import ExpertPool, StreamBuffer, llc_bytes, time_call  # noqa: E402
from planner.profile.measure_dense import DecodeStepBench, DenseLayerBench, LayerShape  # noqa: E402
from planner.profile.measure_moe import MoeLayerBench  # noqa: E402
from runtime.plan import Plan  # noqa: E402
from runtime.session import Session  # noqa: E402

PROMPT = "def read_file(path):\n    with open("


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-moe"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per generation (48, as the demo)")
    parser.add_argument("--repeats", type=int, default=40, help="repeats of each profiler timing per round")
    args = parser.parse_args()

    m = load_model_shape(args.model)
    dtype = m.dtype
    plan = Plan.from_dict({"version": 2, "model": {"name": m.name, "path": args.model, "dtype": dtype},
                           "hardware": {"accelerator": "cpu", "cpu_threads": args.threads},
                           "cache": {"slots": 0, "policy": "lru"}, "miss": {"compute": "cpu"}})
    session = Session.load(plan)
    layers = session.loaded.model.model.layers
    inside = {"s": 0.0}
    native = session.engine.native
    if native is not None and native.enabled:  # the native decode step: each layer timed through its seam
        def around(index, run):
            start = time.perf_counter()
            out = run()
            inside["s"] += time.perf_counter() - start
            return out
        native.around_layer = around
    else:
        for layer in layers:  # each layer's forward timed in place: the token's split
            forward = layer.forward

            def timed(*a, _forward=forward, **k):
                start = time.perf_counter()
                out = _forward(*a, **k)
                inside["s"] += time.perf_counter() - start
                return out
            layer.forward = timed

    shape = LayerShape(m.name, m.hidden, m.expert_intermediate, m.num_heads, m.num_kv_heads, m.head_dim,
                       m.num_experts, m.top_k, m.vocab)
    torch.set_num_threads(args.threads)
    dense = DenseLayerBench(shape, dtype, "cpu")
    step = DecodeStepBench(shape, dtype, "cpu")
    llc = llc_bytes() or 0
    prompt_tokens = len(session.loaded.tokenizer(PROMPT)["input_ids"])
    context = prompt_tokens + args.tokens // 2
    # as the cost model picks the profile's rows: warm where a token's bytes fit the LLC, else cold
    cache = "warm" if llc and decode_bytes(m, context) <= llc else "cold"
    stream = StreamBuffer(1 << 30) if cache == "cold" else None
    moe = MoeLayerBench(ExpertPool(shape.hidden, shape.intermediate, dtype, pool_bytes=0 if cache == "warm" else None,
                                   min_copies=2 * shape.experts_per_token))
    old_step = OldDecodeStepBench(shape, dtype)
    n_layers = len(layers)

    rows = []
    print(f"{m.name}: {n_layers} layers, {args.threads} threads, LLC {llc / 2**20:.0f} MiB, "
          f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    for rnd in range(args.rounds):
        stamps: list[tuple[float, float]] = []
        session.generate(PROMPT, max_new_tokens=args.tokens,
                         on_token=lambda i, t: stamps.append((time.perf_counter(), inside["s"])))
        total = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
        in_layers = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
        outside = [t - x for t, x in zip(total, in_layers)]
        torch.set_num_threads(args.threads)
        # the profiler's flush before each repeat of the dense and step timings
        experts = moe.neighbour(shape.experts_per_token, args.threads, cache, llc, lambda: stream)
        timing = dict(warmup=3, repeats=args.repeats)
        dense_t = dense.time(1, context, flush=experts, **timing)
        moe_t = moe.time("token", shape.experts_per_token, 1, args.threads, cache, **timing)
        step_t, loop_t, _ = step.time_in_loop(32, flush=experts, **timing)
        old_t = old_step.time(32, flush=experts, **timing)
        row = {
            "run token": (min(total), statistics.median(total)),
            "run layer": (min(in_layers) / n_layers, statistics.median(in_layers) / n_layers),
            "run outside layers": (min(outside), statistics.median(outside)),
            "profile dense": (dense_t.min_s, dense_t.median_s),
            "profile MoE token": (moe_t.min_s, moe_t.median_s),
            "profile layer": (dense_t.min_s + moe_t.min_s, dense_t.median_s + moe_t.median_s),
            "profile step (before)": (old_t.min_s, old_t.median_s),
            "profile step": (step_t.min_s, step_t.median_s),
            "profile layer in the loop": (loop_t.min_s, loop_t.median_s),
        }
        row["profile token (before)"] = tuple(n_layers * row["profile layer"][i] + row["profile step (before)"][i]
                                              for i in (0, 1))
        # as the cost model adds them (CostModel.loop_extra_s): the layer in the loop, never below its experts
        row["profile token"] = tuple(n_layers * max(row["profile MoE token"][i], row["profile layer in the loop"][i])
                                     + row["profile step"][i] for i in (0, 1))
        rows.append(row)
        print(f"round {rnd + 1}: " + ", ".join(f"{k} {v[0] * 1e3:.3f}/{v[1] * 1e3:.3f}" for k, v in row.items()),
              file=sys.stderr, flush=True)

    print(f"\n{m.name}, {args.threads} threads, {cache} rows, {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.1f} after; "
          f"ms, median over rounds of each round's fastest and median token (or timing)\n")
    print("| piece | fastest | median |")
    print("|---|---|---|")
    for key in rows[0]:
        fast = statistics.median(r[key][0] for r in rows) * 1e3
        mid = statistics.median(r[key][1] for r in rows) * 1e3
        print(f"| {key} | {fast:.3f} | {mid:.3f} |")
    if n_layers > 1:
        slope_intercept(session, layers, args)
    for label in ("profile token (before)", "profile token"):
        fast = statistics.median(r["run token"][0] / r[label][0] for r in rows)
        mid = statistics.median(r["run token"][1] / r[label][1] for r in rows)
        print(f"\n{label}: as tokens/s, predicted / measured = {fast:.3f} (fastest tokens), {mid:.3f} (median tokens)")
    return 0


def slope_intercept(session: Session, layers: torch.nn.ModuleList, args: argparse.Namespace) -> None:
    """The runtime's decode token with only the first n decoder layers (n = 1, 2, all), round after round:
    the slope over n is what one more layer costs in a run, the rest what the token costs outside them
    (the generated text changes with n; the work per token does not)."""
    model = session.loaded.model
    counts = sorted({1, 2, len(layers)})
    fastest: dict[int, list[float]] = {n: [] for n in counts}
    median: dict[int, list[float]] = {n: [] for n in counts}
    try:
        for _ in range(args.rounds):
            for n in counts:
                model.model.layers = layers[:n]
                model.config.num_hidden_layers = n
                stamps: list[float] = []
                session.generate(PROMPT, max_new_tokens=args.tokens, on_token=lambda i, t: stamps.append(time.perf_counter()))
                d = [b - a for a, b in zip(stamps, stamps[1:])]
                fastest[n].append(min(d))
                median[n].append(statistics.median(d))
    finally:
        model.model.layers = layers
        model.config.num_hidden_layers = len(layers)
    print("\nThe runtime's decode token with the first n layers (ms, median over rounds):\n")
    print("| layers | fastest token | median token |")
    print("|---|---|---|")
    for n in counts:
        print(f"| {n} | {statistics.median(fastest[n]) * 1e3:.3f} | {statistics.median(median[n]) * 1e3:.3f} |")
    lo, hi = counts[0], counts[-1]
    for label, table in (("fastest", fastest), ("median", median)):
        a, b = statistics.median(table[lo]), statistics.median(table[hi])
        slope = (b - a) / (hi - lo)
        print(f"\n{label} tokens: one more layer {slope * 1e3:.3f} ms, outside the layers {(a - lo * slope) * 1e3:.3f} ms")


class OldDecodeStepBench:
    """The decode step outside the layers as the profiler timed it before 2026-12-07: transformers' forward
    (one decoder layer that only appends to the KV cache, its time taken off) and the runtime's sampler, in
    a loop of the profiler's own; what the runtime's generation loop adds around them was not timed."""

    def __init__(self, shape: LayerShape, dtype: str) -> None:
        from transformers import DynamicCache, MixtralConfig, MixtralForCausalLM

        from planner.profile.measure import TORCH_DTYPES
        from runtime.cpu_decode import use_cpu_decode_path
        from runtime.kernels import load
        from runtime.kv_cache import use_growing_layers
        from runtime.sampling import Sampler

        config = MixtralConfig(hidden_size=shape.hidden, intermediate_size=1, num_hidden_layers=1,
                               num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                               head_dim=shape.head_dim, num_local_experts=shape.num_experts,
                               num_experts_per_tok=shape.experts_per_token, sliding_window=None,
                               vocab_size=shape.vocab, max_position_embeddings=1 << 16, tie_word_embeddings=False)
        config._attn_implementation = "sdpa"
        model = MixtralForCausalLM(config)
        kv = (shape.kv_heads, shape.head_dim)
        seconds = {"s": 0.0}

        class CacheOnly(torch.nn.Module):
            def forward(self, hidden_states, *a, **k):
                start = time.perf_counter()
                cache = k.get("cache", k.get("past_key_values"))
                z = hidden_states.new_zeros(1, kv[0], hidden_states.shape[1], kv[1])
                cache.update(z, z, 0)
                seconds["s"] += time.perf_counter() - start
                return hidden_states
        model.model.layers[0] = CacheOnly()
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=gen) * 0.02)
        self.model = model.to(TORCH_DTYPES[dtype]).eval()
        use_cpu_decode_path(self.model, [], load(), torch.get_num_threads())
        self.config, self.seconds, self.sampler = config, seconds, Sampler(0.0, 1.0, 0)
        self._cache_types = (DynamicCache, use_growing_layers)

    def time(self, context: int, *, warmup: int, repeats: int, flush=None):
        from runtime.cpu_decode import set_kernel_threads

        DynamicCache, use_growing_layers = self._cache_types
        set_kernel_threads(self.model, torch.get_num_threads())
        cache = DynamicCache(config=self.config)
        use_growing_layers(cache)
        state = {"input": torch.tensor([[3] * context])}

        def before() -> None:
            if flush is not None:
                flush()
            self.seconds["s"] = 0.0

        def call() -> None:
            logits = self.model(input_ids=state["input"], cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
            state["input"] = torch.tensor([[self.sampler.pick(logits)]])

        with torch.inference_mode():
            call()
            return time_call(call, warmup=warmup, repeats=repeats, before=before, exclude=lambda: self.seconds["s"])


if __name__ == "__main__":
    sys.exit(main())
