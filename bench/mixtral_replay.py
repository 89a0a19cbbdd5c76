"""Mixtral-8x7B-shaped checkpoint (random bf16 weights), routing replayed from a trace, four plans:
decode tokens/s measured by `moeplan run` beside what `moeplan explain` predicts.

Plans: the tuned plan (`moeplan tune` for the given accelerator budget), the seed paper's hand
configuration (equal slots on a prefix of the layers, LRU, misses on the CPU with promotion, all
cores), all experts on the CPU (llama.cpp's --cpu-moe), and copy-on-miss (every miss copied to the
accelerator and computed there, LRU, the budget split evenly). Made for bench/device_check.sh on a
CUDA host; with --accelerator cpu it runs anywhere (slowly).

    .venv/bin/python bench/mixtral_replay.py --layers 8 --profile profiles/x.yaml --vram-budget 12GB --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the CLI through this interpreter, the checkout first on its path: on a device machine there is no .venv
# (and no installed moeplan), only the image's python3
MOEPLAN = [sys.executable, "-m", "planner.cli"]
MOEPLAN_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


COMPLETE = ".complete"  # written into a checkpoint folder only once it is fully saved


def build_checkpoint(folder: Path, layers: int) -> None:
    """hidden 4096, expert intermediate 14336, 8 experts, top-2, 32/8 heads: Mixtral-8x7B's config.json.

    Saved into a temporary folder beside `folder`, renamed when complete, then marked: a save that was
    killed leaves no folder that a later run would take as built."""
    import shutil
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from model_factory import make_tokenizer

    config = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                           num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                           num_experts_per_tok=2, max_position_embeddings=4096, rope_theta=1e6,
                           tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    model.to_empty(device="cpu")
    model.to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)  # unmarked: an earlier build that did not finish
    model.save_pretrained(partial)
    make_tokenizer(partial)
    partial.rename(folder)
    (folder / COMPLETE).write_text(f"{layers} layers\n")


def moeplan_json(*args: str) -> dict:
    proc = subprocess.run([*MOEPLAN, *args], capture_output=True, text=True, env=MOEPLAN_ENV)
    if proc.returncode != 0:
        raise SystemExit(f"moeplan {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan_text(name: str, accelerator: str, threads: int, slots, policy: str, compute: str, promote: bool) -> str:
    return (f"version: 1\nmodel: {{name: {name}, dtype: bfloat16}}\n"
            f"hardware: {{accelerator: '{accelerator}', cpu_threads: {threads}}}\n"
            f"cache: {{slots: {json.dumps(slots)}, policy: {policy}, preload: none}}\n"
            f"miss: {{compute: {compute}, transfer_min_tokens: 0, promote: {str(promote).lower()}}}\n"
            "prefetch: {lookahead: 0}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--vram-budget", default="12GB")
    ap.add_argument("--accelerator", default="cuda:0")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--out", default=str(ROOT / "bench/results/device"))
    ap.add_argument("--model-dir", default=str(ROOT / "bench/models/mixtral-shaped"))
    ap.add_argument("--build-only", action="store_true", help="build the checkpoint (if not built) and stop")
    args = ap.parse_args()
    out, folder = Path(args.out), Path(args.model_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not (folder / COMPLETE).exists():
        print(f"building a {args.layers}-layer Mixtral-shaped checkpoint in {folder} ...", file=sys.stderr, flush=True)
        build_checkpoint(folder, args.layers)
    if args.build_only:
        return 0

    from planner.catalog import load_model_shape
    from planner.commands.tune import parse_bytes  # the same parser as `tune --vram-budget`
    from runtime.contracts.traces import write_trace
    from planner.routing.workload import synthetic_trace

    shape = load_model_shape(str(folder))
    trace_path = out / "trace.jsonl"
    trace, source = synthetic_trace(shape, ROOT / "traces", seed=0)
    write_trace(trace_path, trace)
    print(f"trace: {source}", file=sys.stderr)
    cores = os.cpu_count() or 1
    L, E = shape.num_moe_layers, shape.num_experts
    budget = parse_bytes(args.vram_budget)
    fit = max(0, int((budget - shape.dense_bytes - shape.kv_bytes_per_token * 2048) // shape.expert_bytes))
    per_layer = min(E, fit // L)
    prefix = min(L, fit // (E // 2)) if E >= 2 else 0
    plans = {
        "tuned": None,
        "seed paper (prefix, LRU, CPU misses + promote)": plan_text(
            "seed", args.accelerator, cores, [E // 2] * prefix + [0] * (L - prefix), "lru", "cpu", True),
        "all experts on CPU (--cpu-moe)": plan_text("cpu-moe", args.accelerator, cores, 0, "lru", "cpu", False),
        "copy on miss (LRU)": plan_text("copy", args.accelerator, cores, per_layer, "lru", "accelerator", False),
    }
    tuned = out / "tuned.yaml"
    subprocess.run([*MOEPLAN, "tune", "--model", str(folder), "--profile", args.profile, "--trace", str(trace_path),
                    "--vram-budget", args.vram_budget, "--trials", str(args.trials), "--out", str(tuned),
                    "--no-progress"], check=True, env=MOEPLAN_ENV)
    rows = []
    for name, text in plans.items():
        path = tuned if text is None else out / f"{name.split()[0]}.yaml"
        if text is not None:
            path.write_text(text)
        pred = moeplan_json("explain", str(path), "--profile", args.profile, "--trace", str(trace_path),
                            "--model", str(folder), "--json")
        ran = moeplan_json("run", str(path), "--model", str(folder), "--replay-trace", str(trace_path),
                           "--max-new-tokens", str(args.tokens), "--json")
        rows.append((name, ran["decode_tokens_per_s"], pred["decode_tokens_per_s"], ran["cache"]["hit_rate"],
                     pred["hit_rate"]))
        print(f"{name}: measured {rows[-1][1]:.2f} tok/s, predicted {rows[-1][2]:.2f}", file=sys.stderr, flush=True)
    lines = [f"Mixtral-shaped, {L} layers, budget {args.vram_budget} ({fit} experts of {L * E}), {args.accelerator}",
             "| plan | measured decode tok/s | predicted | measured hit rate | predicted |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {m:.2f} | {p:.2f} | {h:.1%} | {ph:.1%} |" for n, m, p, h, ph in rows]
    (out / "mixtral_replay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
