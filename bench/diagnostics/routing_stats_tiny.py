"""Routing statistics of the tiny MoE on held-out text, compared with the OLMoE decode trace.

Measures, per MoE layer: expert popularity skew (share of all selections taken by the most used
10% / 25% of experts, counted as ceil(fraction * E) experts) over the whole text and within short
windows, and next-token reuse (share of a token's k experts that the previous token also used).
Runs plain transformers with output_router_logits=True: for a causal model the routing of a
teacher-forced forward pass over a text equals the routing of decoding that text token by token.

    .venv/bin/python bench/diagnostics/routing_stats_tiny.py --model models/tiny-moe \
        --trace traces/olmoe-1b-7b-decode-299.jsonl --out bench/results/routing_tiny_moe.md
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# Routing of one layer: one list of selected expert ids per token, in token order.
LayerRouting = list[list[int]]


@dataclass(frozen=True)
class LayerStats:
    top10_share: float  # share of selections taken by the ceil(0.10 * E) most used experts
    top25_share: float  # same for ceil(0.25 * E) experts
    window_top25_share: float  # top-25% share computed inside each window, averaged over windows
    reuse: float  # mean |S_t & S_{t-1}| / k over t >= 1


@dataclass(frozen=True)
class Baseline:
    """What uniform independent routing would give with E experts and top-k."""

    top10_share: float
    top25_share: float
    window_top25_share: float  # simulated: small windows show skew even under uniform routing
    reuse: float


def top_share(counts: Counter, num_experts: int, fraction: float) -> float:
    n = max(1, math.ceil(fraction * num_experts))
    total = sum(counts.values())
    return sum(c for _, c in counts.most_common(n)) / total if total else 0.0


def uniform_baseline(num_experts: int, top_k: int, window: int, seed: int = 0, trials: int = 2000) -> Baseline:
    # Uniform popularity: every expert gets 1/E of the selections. Independent random k-subsets
    # share k*k/E experts on average, i.e. a reuse of k/E. In a short window the most used experts
    # take more than their share by chance alone: that baseline is simulated (seeded).
    rng = random.Random(seed)
    sims = [
        top_share(Counter(e for _ in range(window) for e in rng.sample(range(num_experts), top_k)), num_experts, 0.25)
        for _ in range(trials)
    ]
    return Baseline(
        top10_share=max(1, math.ceil(0.10 * num_experts)) / num_experts,
        top25_share=max(1, math.ceil(0.25 * num_experts)) / num_experts,
        window_top25_share=sum(sims) / trials,
        reuse=top_k / num_experts,
    )


def layer_stats(rows: LayerRouting, num_experts: int, window: int) -> LayerStats:
    counts = Counter(e for ids in rows for e in ids)
    k = len(rows[0])
    reuse = [len(set(a) & set(b)) / k for a, b in zip(rows, rows[1:])]
    wins = [rows[i : i + window] for i in range(0, len(rows) - window + 1, window)]
    win_shares = [top_share(Counter(e for ids in w for e in ids), num_experts, 0.25) for w in wins]
    return LayerStats(
        top10_share=top_share(counts, num_experts, 0.10),
        top25_share=top_share(counts, num_experts, 0.25),
        window_top25_share=sum(win_shares) / len(win_shares) if win_shares else float("nan"),
        reuse=sum(reuse) / len(reuse) if reuse else float("nan"),
    )


def model_routing(model_dir: Path, text: str, max_tokens: int, threads: int) -> tuple[list[LayerRouting], int, int, int]:
    """Route `text` (its first max_tokens tokens) through the model; returns per-layer routing, E, k, tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    cfg = model.config
    ids = tok(text, return_tensors="pt")["input_ids"][:, :max_tokens]
    ctx = cfg.max_position_embeddings
    per_layer: list[LayerRouting] = [[] for _ in range(cfg.num_hidden_layers)]
    with torch.no_grad():
        # Windows of the trained context length, in order: routing continues across windows as a
        # fresh context would (the model never saw longer contexts).
        for s in range(0, ids.shape[1], ctx):
            chunk = ids[:, s : s + ctx]
            out = model(input_ids=chunk, output_router_logits=True)
            for layer, logits in enumerate(out.router_logits):
                top = torch.topk(logits.float(), cfg.num_experts_per_tok, dim=-1).indices
                per_layer[layer].extend(sorted(r) for r in top.tolist())
    return per_layer, cfg.num_local_experts, cfg.num_experts_per_tok, ids.shape[1]


def trace_routing(path: Path) -> tuple[list[LayerRouting], int, int]:
    """OLMoE trace: one JSON line per decode step, {"tok": n, "layers": [[ids] x L]}."""
    steps = [json.loads(line)["layers"] for line in path.read_text().splitlines() if line.strip()]
    n_layers = len(steps[0])
    per_layer = [[step[layer] for step in steps] for layer in range(n_layers)]
    num_experts = 1 + max(e for step in steps for ids in step for e in ids)
    return per_layer, num_experts, len(steps[0][0])


def heldout_text(model_dir: Path) -> tuple[str, list[str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = (model_dir / "heldout_files.txt").read_text().split()
    found = [n for n in names if (stdlib / n).is_file()]
    if not found:
        raise SystemExit(f"{model_dir}/heldout_files.txt: none of its {len(names)} files exist under {stdlib}")
    return "\n".join((stdlib / n).read_text(encoding="utf-8", errors="replace") for n in found), found


def table(title: str, stats: list[LayerStats], base: Baseline) -> list[str]:
    lines = [f"### {title}", "", "| layer | top-10% share | top-25% share | top-25% share per window | next-token reuse |",
             "|---|---|---|---|---|"]
    for i, s in enumerate(stats):
        lines.append(f"| {i} | {s.top10_share:.3f} | {s.top25_share:.3f} | {s.window_top25_share:.3f} | {s.reuse:.3f} |")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    lines.append(f"| mean | {mean([s.top10_share for s in stats]):.3f} | {mean([s.top25_share for s in stats]):.3f} "
                 f"| {mean([s.window_top25_share for s in stats]):.3f} | {mean([s.reuse for s in stats]):.3f} |")
    lines.append(f"| uniform | {base.top10_share:.3f} | {base.top25_share:.3f} | {base.window_top25_share:.3f} | {base.reuse:.3f} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("models/tiny-moe"))
    p.add_argument("--trace", type=Path, default=Path("traces/olmoe-1b-7b-decode-299.jsonl"))
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=32, help="tokens per window for the windowed skew")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    args = p.parse_args(argv)

    text, files = heldout_text(args.model)
    tiny, e_tiny, k_tiny, n_tok = model_routing(args.model, text, args.max_tokens, args.threads)
    tiny_stats = [layer_stats(rows, e_tiny, args.window) for rows in tiny]
    olmoe, e_ol, k_ol = trace_routing(args.trace)
    ol_stats = [layer_stats(rows, e_ol, args.window) for rows in olmoe]

    lines = [
        "# Routing of the tiny MoE vs the OLMoE decode trace",
        "",
        f"Command: `.venv/bin/python bench/diagnostics/routing_stats_tiny.py --model {args.model} --trace {args.trace} "
        f"--max-tokens {args.max_tokens} --window {args.window}`",
        "",
        f"- tiny MoE ({args.model}): {e_tiny} experts, top-{k_tiny}, {len(tiny)} MoE layers; "
        f"{n_tok} tokens of held-out stdlib text ({len(files)} files never trained on, routed in "
        "windows of the trained context length).",
        f"- OLMoE-1B-7B trace ({args.trace.name}): {e_ol} experts, top-{k_ol}, {len(olmoe)} layers, "
        f"{len(olmoe[0])} decode steps.",
        f"- Top-x% share: selections taken by the ceil(x% * E) most used experts of that layer "
        f"(tiny: {max(1, math.ceil(0.1 * e_tiny))} and {max(1, math.ceil(0.25 * e_tiny))} experts; "
        f"OLMoE: {max(1, math.ceil(0.1 * e_ol))} and {max(1, math.ceil(0.25 * e_ol))}). Per window: the same "
        f"inside consecutive {args.window}-token windows, averaged. Reuse: share of a token's k experts "
        "that the previous token also selected.",
        "",
    ]
    lines += table(f"tiny MoE (E={e_tiny}, k={k_tiny})", tiny_stats, uniform_baseline(e_tiny, k_tiny, args.window))
    lines += table(f"OLMoE-1B-7B (E={e_ol}, k={k_ol})", ol_stats, uniform_baseline(e_ol, k_ol, args.window))
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
