"""Predicted vs measured decode tokens/s of CPU-only plans of the benchmark model.

    .venv/bin/python bench/predict_vs_measure.py [--profile profiles/<host>.yaml] [--tokens 48]

The benchmark model is Mixtral-shaped with random weights (hidden 1024, expert intermediate 3584,
8 layers, 8 experts, top-2, 16 heads / 8 KV heads, bfloat16, about 1.4 GB); it is built under
bench/models/ when missing. For each plan the script runs `moeplan run --json --trace-out`, then
`moeplan explain --json` on the routing that run recorded (so the cache replay sees the run's own
routing), and writes bench/results/predict_vs_measure.md with the two figures side by side.
Each `run` is a fresh process: the first runs pay for the page cache, so the checkpoint is read once
before timing.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from runtime.atomic import write_atomic

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "bench" / "models" / "mixtral-bench"
RESULTS = ROOT / "bench" / "results" / "predict_vs_measure.md"
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"

# (label, hardware.cpu_threads, cache section, miss section): CPU-only plans that differ in threads,
# slots, promotion and the transfer threshold.
PLANS = [
    ("t1-s0", 1, {"slots": 0, "policy": "lru"}, {"compute": "cpu", "transfer_min_tokens": 0, "promote": False}),
    ("t2-s0", 2, {"slots": 0, "policy": "lru"}, {"compute": "cpu", "transfer_min_tokens": 0, "promote": False}),
    ("t2-s4-promote", 2, {"slots": 4, "policy": "lru"}, {"compute": "cpu", "transfer_min_tokens": 0, "promote": True}),
    ("t1-s2-promote", 1, {"slots": 2, "policy": "lfu"}, {"compute": "cpu", "transfer_min_tokens": 0, "promote": True}),
    ("t2-s4-transfer1", 2, {"slots": 4, "policy": "lru"}, {"compute": "cpu", "transfer_min_tokens": 1, "promote": False}),
    ("t2-s8-promote", 2, {"slots": 8, "policy": "lru"}, {"compute": "cpu", "transfer_min_tokens": 0, "promote": True}),
]


def build_model(folder: Path) -> None:
    """The benchmark checkpoint: random weights, a small byte-level BPE tokenizer trained on stdlib text."""
    import sysconfig

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    text = [p.read_text(encoding="utf-8", errors="ignore") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-d]*.py"))]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    config = MixtralConfig(vocab_size=1024, hidden_size=1024, intermediate_size=3584, num_hidden_layers=8,
                           num_attention_heads=16, num_key_value_heads=8, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
                           tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = MixtralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)


def moeplan(*args: str) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "moeplan"), *args, "--json"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=str(ROOT / "profiles" / f"{socket.gethostname()}.yaml"))
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per run (48)")
    parser.add_argument("--only", nargs="*", help="plan labels to run (default: all)")
    args = parser.parse_args()
    if not (MODEL_DIR / "config.json").is_file():
        print(f"building the benchmark checkpoint in {MODEL_DIR}", file=sys.stderr)
        build_model(MODEL_DIR)
    for f in MODEL_DIR.glob("*.safetensors"):  # warm the page cache so that no run pays the disk
        f.read_bytes()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, threads, cache, miss in PLANS:
            if args.only and label not in args.only:
                continue
            plan_path = Path(tmp) / f"{label}.yaml"
            plan_path.write_text(yaml.safe_dump({
                "version": 1, "model": {"name": "mixtral-bench", "path": str(MODEL_DIR), "dtype": "bfloat16"},
                "hardware": {"accelerator": "cpu", "cpu_threads": threads, "profile": Path(args.profile).stem},
                "cache": {**cache, "preload": "none"}, "miss": miss, "prefetch": {"lookahead": 0}}))
            trace = Path(tmp) / f"{label}.jsonl"
            start = time.perf_counter()
            measured = moeplan("run", str(plan_path), "--prompt", PROMPT, "--max-new-tokens", str(args.tokens),
                               "--trace-out", str(trace))
            wall = time.perf_counter() - start
            prompt_tokens = measured["prompt_tokens"]
            context = prompt_tokens + args.tokens // 2  # the mean KV length over the decode steps
            predicted = moeplan("explain", str(plan_path), "--profile", args.profile, "--trace", str(trace),
                                "--context", str(context), "--prompt-tokens", str(prompt_tokens))
            ratio = predicted["decode_tokens_per_s"] / measured["decode_tokens_per_s"]
            rows.append((label, threads, cache, miss, measured, predicted, ratio, wall))
            print(f"{label:18s} measured {measured['decode_tokens_per_s']:7.2f} tok/s  predicted "
                  f"{predicted['decode_tokens_per_s']:7.2f} tok/s  ratio {ratio:.3f}  hit rate "
                  f"{measured['cache']['hit_rate']:.3f} / {predicted['hit_rate']:.3f}", file=sys.stderr)
    write_results(rows, args)
    return 0


def write_results(rows: list, args: argparse.Namespace) -> None:
    lines = [
        "# Predicted vs measured decode tokens/s (CPU-only plans)",
        "",
        f"Host `{socket.gethostname()}`, profile `{Path(args.profile).name}`, benchmark model "
        f"(Mixtral-shaped, random weights, {MODEL_DIR.relative_to(ROOT)}), {args.tokens} new tokens, "
        "greedy. Command: `.venv/bin/python bench/predict_vs_measure.py`.",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "",
        "| plan | threads | slots | policy | promote | transfer_min_tokens | hit rate run / sim | "
        "measured tok/s | predicted tok/s | predicted / measured |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, threads, cache, miss, m, p, ratio, _ in rows:
        lines.append(f"| {label} | {threads} | {cache['slots']} | {cache['policy']} | {miss['promote']} | "
                     f"{miss['transfer_min_tokens']} | {m['cache']['hit_rate']:.3f} / {p['hit_rate']:.3f} | "
                     f"{m['decode_tokens_per_s']:.2f} | {p['decode_tokens_per_s']:.2f} | {ratio:.3f} |")
    within = sum(1 for r in rows if abs(r[6] - 1) <= 0.15)
    lines += ["", f"{within} of {len(rows)} plans within 15 %.", ""]
    write_atomic(RESULTS, "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
