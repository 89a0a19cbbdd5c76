"""Which int4/int8 quantization rule loses least: reconstruction error of the expert weights, rule by rule.

Rules (group size 32 unless --group-size, float16 scales as stored):
- int4 q4_0 5-bit: scale = signed max / -8 with its magnitude rounded up to 5 significant bits, codes [-8, 7]
  (runtime/quant_format.py's int4 rule: the CPU kernel takes such a scale out of each group's sum exactly);
- int4 q4_0: scale = signed max / -8 as a float16, codes [-8, 7] (llama.cpp Q4_0; moeplan's int4 rule before
  2026-12-07 06:40 UTC);
- int4 absmax7: scale = absmax / 7, codes [-7, 7] (the plain symmetric rule);
- int8 pow2: scale = absmax / 127 rounded up to a power of two, codes [-127, 127] (runtime/quant_format.py's
  int8 rule: the CPU kernel takes a power-of-two scale out of each group's sum exactly);
- int8 absmax127: scale = absmax / 127, codes [-127, 127] (llama.cpp Q8_0; moeplan's int8 rule before
  2026-12-07 06:30 UTC).
Weights: Gaussian matrices, and the routed experts of the embedded model (models/tiny-moe, trained).
Reported: relative mean squared error, mean(|w - w'|^2) / mean(w^2).

    .venv/bin/python bench/quant_rule.py --out bench/results/quant_rule.md
"""
from __future__ import annotations

import argparse
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open

from runtime.quant_format import dequantize, quantize

ROOT = Path(__file__).resolve().parent.parent
_FP16_MAX = float(torch.finfo(torch.float16).max)


def absmax7(w: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    scale = (g.abs().amax(-1) / 7.0).to(torch.float16).float().unsqueeze(-1)
    inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    return (torch.round(g * inv).clamp(-7, 7) * scale).reshape(n, k)


def q4_0(w: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    m = torch.gather(g, -1, g.abs().argmax(-1, keepdim=True))
    scale = (m / -8.0).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).float()
    inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    return (torch.round(g * inv).clamp(-8, 7) * scale).reshape(n, k)


def absmax127(w: torch.Tensor, group: int) -> torch.Tensor:
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    scale = (g.abs().amax(-1) / 127.0).clamp(max=_FP16_MAX).to(torch.float16).float().unsqueeze(-1)
    inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
    return (torch.round(g * inv).clamp(-127, 127) * scale).reshape(n, k)


def relative_mse(w: torch.Tensor, back: torch.Tensor) -> float:
    w = w.float()
    return float(((w - back.float()) ** 2).mean() / (w ** 2).mean())


def errors(w: torch.Tensor, group: int) -> dict[str, float]:
    out = {}
    for fmt, name in (("int4", "int4 q4_0 5-bit"), ("int8", "int8 pow2")):
        q, s = quantize(w, fmt, group)
        out[name] = relative_mse(w, dequantize(q, s, fmt, torch.float32))
    out["int4 absmax7"] = relative_mse(w, absmax7(w, group))
    out["int4 q4_0"] = relative_mse(w, q4_0(w, group))
    out["int8 absmax127"] = relative_mse(w, absmax127(w, group))
    return out


def tiny_moe_experts() -> list[torch.Tensor]:
    mats = []
    with safe_open(str(ROOT / "models/tiny-moe/model.safetensors"), "pt") as f:
        for key in f.keys():
            if ".experts." in key and key.endswith("weight") or key.endswith(("gate_up_proj", "down_proj")):
                t = f.get_tensor(key)
                mats += list(t) if t.dim() == 3 else [t]
    return mats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    sets = {"gaussian 1024x3584 x4": [torch.randn(1024, 3584) * 0.02 for _ in range(4)],
            "tiny-moe routed experts": tiny_moe_experts()}
    rows = []
    for name, mats in sets.items():
        total: dict[str, float] = {}
        for m in mats:
            if m.shape[-1] % args.group_size:
                continue
            for rule, e in errors(m, args.group_size).items():
                total[rule] = total.get(rule, 0.0) + e / len(mats)
        rows.append((name, len(mats), total))
    lines = [f"# Quantization rule: relative MSE of expert weights (group size {args.group_size})", "",
             f"Date {datetime.now(timezone.utc).isoformat(timespec='seconds')}, {platform.machine()}, torch "
             f"{torch.__version__}. Command: `.venv/bin/python bench/quant_rule.py --out bench/results/quant_rule.md`.",
             "", "| weights | matrices | int4 q4_0 (signed max / -8) | int4 q4_0, scale up to 5 bits | 5-bit / q4_0 | "
             "int4 absmax / 7 | absmax7 / q4_0 | "
             "int8 absmax / 127 | int8 pow2 (absmax / 127 up to 2^e) | pow2 / absmax127 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, count, e in rows:
        lines.append(f"| {name} | {count} | {e['int4 q4_0']:.3e} | {e['int4 q4_0 5-bit']:.3e} | "
                     f"{e['int4 q4_0 5-bit'] / e['int4 q4_0']:.3f} | {e['int4 absmax7']:.3e} | "
                     f"{e['int4 absmax7'] / e['int4 q4_0']:.3f} | {e['int8 absmax127']:.3e} | {e['int8 pow2']:.3e} | "
                     f"{e['int8 pow2'] / e['int8 absmax127']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
