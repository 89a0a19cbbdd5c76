"""Time plain transformers `generate` on a checkpoint: the baseline moeplan is compared against.

Prints one JSON object: prefill seconds (prompt to first token), decode tokens/s (the tokens after the
first), peak resident memory. Greedy, KV cache, the experts implementation given by --impl.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList


class Stamps(LogitsProcessor):
    """Records the time at which each new token's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--impl", default="eager", help="experts implementation: eager, batched_mm, grouped_mm")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", default="def fibonacci(n):")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 experts_implementation=args.impl).eval()
    ids = tok(args.prompt, return_tensors="pt")
    stamps = Stamps()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([stamps]), pad_token_id=tok.eos_token_id)
    n = out.shape[1] - ids["input_ids"].shape[1]
    decode = stamps.times[-1] - stamps.times[0]
    print(json.dumps({"impl": args.impl, "generated": n, "prefill_seconds": stamps.times[0] - start,
                      "decode_tokens_per_s": (n - 1) / decode if decode > 0 else 0.0,
                      "generated_ids": out[0, ids["input_ids"].shape[1]:].tolist(),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
