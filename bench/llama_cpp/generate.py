"""Time llama.cpp (llama-cpp-python) greedy generation on a GGUF file; print one JSON object.

Runs in its own environment (llama-cpp-python is a benchmark dependency only):
    LLAMA_PY bench/llama_cpp/generate.py --gguf X.gguf --tokens 32 --threads 2 --prompt TEXT
Decode tokens/s counts the tokens after the first, between the first and the last token's arrival,
as bench/hf_generate.py and `moeplan run` do.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

from llama_cpp import Llama


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default="def fibonacci(n):")
    args = ap.parse_args()
    llm = Llama(model_path=args.gguf, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=512,
                verbose=False, seed=0)
    # no BOS: moeplan and transformers encode the prompt as `tokenizer(prompt)` does, which adds none here
    prompt_ids = llm.tokenize(args.prompt.encode(), add_bos=False, special=False)
    stamps, ids = [], []
    start = time.perf_counter()
    for token in llm.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        ids.append(int(token))
        if len(ids) >= args.tokens:
            break
    decode = stamps[-1] - stamps[0]
    print(json.dumps({"engine": "llama.cpp", "generated": len(ids), "prefill_seconds": stamps[0] - start,
                      "decode_tokens_per_s": (len(ids) - 1) / decode if decode > 0 else 0.0,
                      "generated_ids": ids, "prompt_tokens": len(prompt_ids),
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
