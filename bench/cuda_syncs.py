"""Count the host syncs of CUDA decode tokens: the seam's own (one per MoE layer, by design) and every other
that `torch.cuda.set_sync_debug_mode("warn")` reports, with where each comes from.

A small random Mixtral-family checkpoint (tests/model_factory.py) and two CUDA plans: one with hits, CPU
misses, promotions and prefetch; one whose misses are all transfers (computed on the GPU through the two
transfer buffers, double-buffered: its copies and events must add no blocking sync). For each, one warm-up
generation, then one generation under the sync debug mode. Needs a CUDA device (bench/device_check.sh runs
it); writes `cuda_syncs.md` into --out.

    .venv/bin/python bench/cuda_syncs.py --out DIR [--tokens 16] [--accelerator cuda:0]
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--accelerator", default="cuda:0")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("cuda_syncs: no CUDA device here", file=sys.stderr)
        return 1
    from model_factory import build_checkpoint, num_experts
    from runtime.device import CudaDevice
    from runtime.plan import Plan
    from runtime.session import Session

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mixtral"
        config = build_checkpoint("mixtral", folder, seed=0, layers=4)
        experts = num_experts(config)
        sections = []
        for name, cache, miss in plans(experts, config.num_hidden_layers):
            plan = Plan.from_dict({
                "version": 1, "model": {"name": "syncs", "dtype": "float32"},
                "hardware": {"accelerator": args.accelerator, "cpu_threads": 2},
                "cache": cache, "miss": miss, "prefetch": {"lookahead": 1 if miss["promote"] else 0}})
            sections.append(count_syncs(name, Session.load(plan, folder), args.tokens, CudaDevice))
        text = "\n".join(sections)
        (out / "cuda_syncs.md").write_text(text)
        print(text)
        return 0


def plans(experts: int, layers: int) -> list[tuple[str, dict, dict]]:
    """(name, cache, miss): hits, CPU misses, promotions and prefetch; and transfers (every miss computed on
    the GPU, a static cache, so they go through the two transfer buffers, double-buffered)."""
    return [("hits, CPU misses, promotions, prefetch",
             {"slots": max(1, experts // 4), "policy": "lru", "preload": "none"},
             {"compute": "cpu", "transfer_min_tokens": 0, "promote": True}),
            ("transfers (static cache, misses on the GPU, double-buffered)",
             {"slots": max(1, experts // 4), "policy": "static",
              "preload": [list(range(max(1, experts // 4)))] * layers},
             {"compute": "accelerator", "transfer_min_tokens": 0, "promote": False})]


def count_syncs(name: str, session, tokens: int, cuda_device: type) -> str:
    """One warm-up generation, then one under the sync debug mode: the seam's fetches and every other sync."""
    import torch

    seam = session.engine.seam
    assert isinstance(seam, cuda_device)
    fetches = [0]
    fetch = seam.fetch

    def counted(layer, tensors):
        fetches[0] += 1
        return fetch(layer, tensors)

    seam.fetch = counted  # type: ignore[method-assign]
    prompt = "def main(argv):\n    for name in"
    session.generate(prompt, max_new_tokens=4)  # warm-up: allocations, kernels, staging buffers
    fetches[0] = 0
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = session.generate(prompt, max_new_tokens=tokens)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in seen if "synchroniz" in str(w.message).lower()]
    where = collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs)
    passes = len(result.generated_ids)  # the prefill pass, then one per further token
    layers = len(session.engine.layers)
    stats = session.engine.stats()
    lines = [f"# Host syncs on {torch.cuda.get_device_name()}: {name}", "",
             f"{layers} MoE layers, {passes} forward passes (1 prefill + {passes - 1} decode); "
             f"cache hits {stats['cache']['hits']}, misses {stats['cache']['misses']}", "",
             f"- seam fetches (the one blocking sync per MoE layer per pass): {fetches[0]} "
             f"= {fetches[0] / passes:.2f} per pass (design: {layers})",
             f"- syncs reported by torch.cuda.set_sync_debug_mode('warn'): {len(syncs)} "
             f"= {len(syncs) / passes:.2f} per pass", "", "| where | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in where.most_common()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
