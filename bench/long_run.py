"""Long runs: resident memory stays flat while the expert cache churns, and hits + misses add up.

    .venv/bin/python bench/long_run.py [--tokens 2000] [--every 100] [--warmup 500]

Builds a small random Mixtral checkpoint (hidden 256, 6 layers, 8 experts, top-2; no EOS so that
generation never stops early), runs a churning plan (2 slots per layer of 8, lru, promotion, accelerator
cpu) through `Session.generate`, and samples the process's resident memory (psutil) every `--every`
tokens through the `on_token` hook. A random model's own routing hardly changes from token to token
(hit rate 0.995 in a first run), so each layer's experts are replayed from a uniform random routing
(`replay_trace`, seeded): the cache misses and evicts on most tokens. The KV cache grows with the context by design: the growth checked
is the RSS growth after warm-up minus `kv_bytes_per_token x new tokens` (both are reported). The
routing is recorded (`trace_out`) so that the cache's hits + misses can be checked against the count
the contract gives: each pass, each MoE layer, each needed expert (union of its tokens' top-k) once.
Writes bench/results/long_run.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

PLAN = """version: 1
model: {{name: long-run, path: {path}, dtype: float32}}
hardware: {{accelerator: cpu, cpu_threads: 1}}
cache: {{slots: 2, policy: lru, preload: none}}
miss: {{compute: cpu, transfer_min_tokens: 0, promote: true}}
"""


@dataclass(frozen=True)
class LongRunResult:
    tokens: int
    seconds: float
    samples: tuple[tuple[int, int], ...]  # (tokens generated, resident bytes)
    kv_bytes_per_token: int
    warmup: int
    hits: int
    misses: int
    expected_needed: int  # sum over passes and layers of the experts the trace says were needed

    def _at_warmup(self) -> tuple[int, int]:
        return next(s for s in self.samples if s[0] >= self.warmup)

    @property
    def raw_growth(self) -> float:
        """RSS growth after warm-up, relative to RSS at warm-up."""
        (t0, r0), (_, r1) = self._at_warmup(), self.samples[-1]
        return (r1 - r0) / r0

    @property
    def growth_without_kv(self) -> float:
        """As raw_growth, less the KV cache's bytes for the tokens added after warm-up."""
        (t0, r0), (t1, r1) = self._at_warmup(), self.samples[-1]
        return (r1 - r0 - self.kv_bytes_per_token * (t1 - t0)) / r0


def build_checkpoint(folder: Path, hidden: int = 256, layers: int = 6, seed: int = 0) -> Path:
    import torch
    import transformers as tf

    from model_factory import make_tokenizer

    torch.manual_seed(seed)
    config = tf.MixtralConfig(vocab_size=320, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                              num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=8192,
                              bos_token_id=0, eos_token_id=None, tie_word_embeddings=False)
    model = tf.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def long_run(model_dir: Path, tokens: int, every: int, warmup: int, work: Path) -> LongRunResult:
    import psutil
    import torch

    from runtime.loader import inspect_model
    from runtime.plan import Plan
    from runtime.session import Session

    torch.set_num_threads(1)  # a shared 2-core machine: one thread, steady timings
    plan = Plan.from_yaml(PLAN.format(path=model_dir))
    replay = work / "uniform-routing.jsonl"
    write_uniform_routing(replay, tokens + 64, layers=_moe_layers(model_dir), seed=0)
    session = Session.load(plan, context_tokens=tokens + 64, replay_trace=replay)
    kv = inspect_model(model_dir, plan.model.dtype).kv_bytes_per_token
    process = psutil.Process()
    samples: list[tuple[int, int]] = []

    def on_token(step: int, token: int) -> None:
        done = step + 1
        if done % every == 0:
            gc.collect()
            samples.append((done, process.memory_info().rss))

    trace = work / "long-run.jsonl"
    start = time.perf_counter()
    result = session.generate("def main(argv):", max_new_tokens=tokens, on_token=on_token, trace_out=trace)
    seconds = time.perf_counter() - start
    if len(result.generated_ids) != tokens:
        raise RuntimeError(f"generation stopped after {len(result.generated_ids)} of {tokens} tokens")
    cache = result.stats["cache"]
    return LongRunResult(tokens, seconds, tuple(samples), kv, warmup, cache["hits"], cache["misses"],
                         needed_from_trace(trace))


def _moe_layers(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])


def write_uniform_routing(path: Path, tokens: int, layers: int, seed: int, experts: int = 8, top_k: int = 2) -> None:
    """Shared-format routing, one token a line: each layer picks top_k distinct experts uniformly."""
    import random

    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"tok": t, "layers": [rng.sample(range(experts), top_k)
                                                             for _ in range(layers)]}) + "\n"
                            for t in range(tokens)))


def needed_from_trace(path: Path) -> int:
    """Each pass, each layer: the number of distinct experts its tokens chose (the contract's count)."""
    lines = path.read_text().splitlines()[1:]
    return sum(len({e for token in layer for e in token}) for line in lines for layer in json.loads(line)["experts"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "long_run.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moeplan-long-run-") as tmp:
        model_dir = build_checkpoint(Path(tmp) / "mixtral-256x6")
        r = long_run(model_dir, args.tokens, args.every, args.warmup, Path(tmp))
    rows = "\n".join(f"| {t} | {rss / 2**20:.1f} | {(rss - r.kv_bytes_per_token * t) / 2**20:.1f} |"
                     for t, rss in r.samples)
    ok_mem = r.growth_without_kv < 0.02
    ok_count = r.hits + r.misses == r.expected_needed
    text = f"""# Long run: resident memory and cache accounting over {r.tokens} tokens

`.venv/bin/python bench/long_run.py --tokens {args.tokens} --every {args.every} --warmup {args.warmup}`
(CPU, 1 thread; random Mixtral checkpoint hidden 256, 6 layers, 8 experts, top-2, float32; plan: 2 slots
per layer, lru, CPU misses with promotion; routing replayed from a uniform random trace, seed 0). {r.tokens} tokens in {r.seconds:.1f} s.

KV cache: {r.kv_bytes_per_token} bytes per token (from the checkpoint's config). The check subtracts it:
growth = (RSS at the end - RSS after {r.warmup} tokens - KV bytes of the tokens in between) / RSS after
warm-up. The routing trace kept in memory for the accounting check also grows (a few hundred bytes per
token) and is not subtracted.

| tokens | RSS MiB | RSS - KV MiB |
|---|---|---|
{rows}

- RSS growth after warm-up: {100 * r.raw_growth:.2f} % raw, {100 * r.growth_without_kv:.2f} % without the KV cache
  (bound 2 %: {'met' if ok_mem else 'NOT met'})
- cache: {r.hits} hits + {r.misses} misses = {r.hits + r.misses}; needed experts in the recorded trace
  (each pass, layer and distinct expert once): {r.expected_needed} ({'equal' if ok_count else 'NOT equal'});
  hit rate {r.hits / max(r.hits + r.misses, 1):.3f}
"""
    from runtime.atomic import write_atomic

    write_atomic(args.out, text)
    print(text)
    return 0 if ok_mem and ok_count else 1


if __name__ == "__main__":
    sys.exit(main())
