"""Convert a checkpoint to GGUF with the converter shipped inside llama-cpp-python's source package.

    python bench/llama_cpp/convert_gguf.py LLAMA_CPP_DIR MODEL_DIR --outtype bf16 --outfile X.gguf

LLAMA_CPP_DIR is `vendor/llama.cpp` of the unpacked `llama-cpp-python` sdist. The converter recognises
a BPE tokenizer by hashing its output on a fixed text and knows only published models' tokenizers;
moeplan's benchmark tokenizers are byte-level BPE with GPT-2's pre-tokenizer (the `tokenizers`
ByteLevel pre-tokenizer), so this wrapper answers "gpt-2" for them and runs the converter unchanged.
Benchmark tooling only: nothing in moeplan imports it.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main() -> None:
    llama_cpp = Path(sys.argv[1]).resolve()
    sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    from conversion import base

    known = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"  # byte-level BPE with GPT-2's split regex, as the tokenizers ByteLevel pre-tokenizer

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(llama_cpp / "convert_hf_to_gguf.py"), *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
