"""Quantize a GGUF file with llama.cpp's own quantizer (`llama_model_quantize`, through llama-cpp-python).

    /path/to/llvenv/bin/python bench/llama_cpp/quantize_gguf.py SRC.gguf DST.gguf q8_0|q4_0 [--threads N]

What `llama-quantize SRC DST Q4_0` does, with its default parameters (not `--pure`): llama.cpp picks the
type of each tensor for the file type (the token embedding and output tensor may get another type, as
its quantizer decides). Benchmark tooling only: runs in llama-cpp-python's own environment; nothing in
moeplan imports it.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys

FILE_TYPES = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def main() -> int:
    import llama_cpp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("type", choices=sorted(FILE_TYPES))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FILE_TYPES[args.type])
    params.nthread = args.threads
    tmp = args.dst + ".partial"
    rc = llama_cpp.llama_model_quantize(args.src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        print(f"quantize_gguf: llama_model_quantize returned {rc}", file=sys.stderr)
        return 1
    os.replace(tmp, args.dst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
