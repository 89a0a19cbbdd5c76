"""Perplexity from llama.cpp's logits over given windows, computed as llama-perplexity computes it.

    /path/to/llvenv/bin/python bench/llama_cpp/perplexity.py MODEL.gguf WINDOWS.json [--threads N]

WINDOWS.json: {"ids": [...], "context": n_ctx, "chunks": n, "bos_id": id or null}, the token ids and the
windows that moeplan scored (bench/perplexity.py writes it), so that both sides score the same tokens.
Each chunk is evaluated from an empty KV cache with its first token replaced by the BOS, and the second
half is scored with llama-perplexity's log-softmax (tools/perplexity/perplexity.cpp: float logits,
double sum). Prints one JSON object: perplexity, nll, tokens, and the file's tensor types.
Benchmark tooling only: runs in llama-cpp-python's own environment; nothing in moeplan imports it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys


def main() -> int:
    import numpy as np
    from llama_cpp import Llama

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("windows")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    spec = json.loads(open(args.windows, encoding="utf-8").read())
    ids, n_ctx, chunks, bos = spec["ids"], spec["context"], spec["chunks"], spec["bos_id"]
    llm = Llama(model_path=args.model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    first = n_ctx // 2
    nll = nll2 = 0.0
    count = 0
    for c in range(chunks):
        window = list(ids[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            window[0] = bos
        llm.reset()  # llama_memory_clear: every chunk from an empty KV cache
        llm.eval(window)
        logits = np.asarray(llm.scores[first:n_ctx - 1], dtype=np.float32)
        top = logits.max(axis=1)
        sums = np.exp(logits - top[:, None]).astype(np.float64).sum(axis=1)
        targets = np.asarray(window[first + 1:])
        values = top.astype(np.float64) + np.log(sums) - logits[np.arange(len(targets)), targets].astype(np.float64)
        nll += float(values.sum())
        nll2 += float((values * values).sum())
        count += n_ctx - first - 1
        print(f"\rllama.cpp chunk {c + 1}/{chunks} ppl {math.exp(nll / count):.4f}", end="", file=sys.stderr)
    print(file=sys.stderr)
    mean = nll / count
    var = nll2 / count - mean * mean
    ppl = math.exp(mean)
    # llama.cpp's own tokenization of the first window's text, to say whether the tokens agree
    print(json.dumps({"perplexity": ppl, "nll": mean, "tokens": count, "chunks": chunks, "context": n_ctx,
                      "perplexity_error": ppl * math.sqrt(var / (count - 1)) if var > 0 else 0.0,
                      "n_vocab": llm.n_vocab()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
