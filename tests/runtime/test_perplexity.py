"""`moeplan perplexity`: llama-perplexity's windows through the runtime, checked against plain transformers
computing the same windows with its own cross-entropy; the --json contract; one-line user errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from model_factory import CORPUS
from planner.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "models" / "tiny-moe"
PLAN = """version: 2
model: {{name: t, path: {path}, dtype: float32, experts: {experts}}}
hardware: {{accelerator: cpu, cpu_threads: 1}}
cache: {{slots: {slots}, policy: lru, preload: none}}
miss: {{compute: cpu, transfer_min_tokens: 0, promote: true}}
prefetch: {{lookahead: 0}}
"""


def write_plan(tmp_path: Path, path: str = "unused", slots: int = 2, experts: str = "float32") -> Path:
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.format(path=path, slots=slots, experts=experts))
    return plan


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def reference(folder: Path, text: str, context: int, max_tokens: int | None = None,
              experts: str = "float32") -> tuple[float, int]:
    """Plain transformers: llama-perplexity's chunks of the text tokenized with its special tokens, each
    chunk's first token the BOS where the tokenizer starts texts with one, the second half of each chunk
    scored with torch's cross-entropy. int8/int4 experts: the checkpoint's experts quantized and dequantized
    (the quantized-expert conformance reference, runtime/quant_format.py's rule) before plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if experts in ("int8", "int4"):
        from runtime.contracts.expert_format import DEFAULT_GROUP_SIZE
        from runtime.loader import find_experts
        from runtime.quant_experts import projection_names
        from runtime.quant_format import dequantize, quantize

        for module in find_experts(model)[0]:
            for name in projection_names(module):
                param = getattr(module, name)
                param.data = dequantize(*quantize(param.data, experts, DEFAULT_GROUP_SIZE), experts, torch.float32)
    ids = tokenizer(text)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    starts_with_bos = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    total, count = 0.0, 0
    with torch.no_grad():
        for c in range(len(ids) // context):
            chunk = ids[c * context:(c + 1) * context]
            if starts_with_bos:
                chunk[0] = tokenizer.bos_token_id
            logits = model(torch.tensor([chunk])).logits[0].double()
            half = context // 2
            loss = torch.nn.functional.cross_entropy(logits[half:context - 1], torch.tensor(chunk[half + 1:]),
                                                     reduction="sum")
            total += float(loss)
            count += context - half - 1
    return math.exp(total / count), count


@pytest.mark.parametrize("model,context,slots,experts", [
    ("factory", 32, 2, "float32"), ("factory", 20, 0, "float32"), ("tiny-moe", 64, 3, "float32"),
    ("factory", 32, 2, "int4"), ("factory", 24, 0, "int8")])
def test_matches_plain_transformers_over_the_same_windows(model, context, slots, experts, checkpoint, tmp_path,
                                                          capsys):
    if model == "factory":
        folder, _ = checkpoint("mixtral")
        text = CORPUS
    else:  # the embedded checkpoint: trained weights, and a tokenizer that starts every text with <s>
        folder = TINY
        text = (ROOT / "runtime" / "perplexity.py").read_text()[:3000]
    text_file = tmp_path / "text.txt"
    text_file.write_text(text)
    code, out, err = run_cli(["perplexity", str(write_plan(tmp_path, slots=slots, experts=experts)), "--model",
                              str(folder), "--text", str(text_file), "--context", str(context), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    expected, count = reference(folder, text, context, experts=experts)
    assert result["tokens"] == count and result["chunks"] * (context - context // 2 - 1) == count
    # float32 plans agree with the reference to about 5e-9; int8 moves this perplexity by about 3e-6 from the
    # unquantized one and int4 by about 5e-4, so the tolerance tells the formats apart
    assert result["perplexity"] == pytest.approx(expected, rel=1e-7)
    assert result["nll"] == pytest.approx(math.log(expected), rel=1e-7)
    assert "perplexity" in err  # the progress bar, on stderr


def test_max_tokens_scores_whole_windows_of_the_first_tokens(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint("mixtral")
    text_file = tmp_path / "text.txt"
    text_file.write_text(CORPUS)
    code, out, err = run_cli(["perplexity", str(write_plan(tmp_path)), "--model", str(folder), "--text",
                              str(text_file), "--context", "16", "--max-tokens", "50", "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    expected, count = reference(folder, CORPUS, 16, max_tokens=50)
    assert result["chunks"] == 3 and result["tokens"] == count == 3 * 7
    assert result["perplexity"] == pytest.approx(expected, rel=1e-7)


def test_plain_output_is_one_line(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint("mixtral")
    text_file = tmp_path / "text.txt"
    text_file.write_text(CORPUS)
    code, out, _ = run_cli(["perplexity", str(write_plan(tmp_path, path=str(folder))), "--text", str(text_file),
                            "--context", "64"], capsys)
    assert code == 0
    assert out.startswith("perplexity ") and len(out.strip().splitlines()) == 1


@pytest.mark.parametrize("case,expected", [
    ("missing-text", "no such text file"),
    ("short-text", "tokenizes to"),
    ("long-context", "--context: 300 tokens is longer than the model's context of 256"),
    ("empty-text", "fewer than one window"),
])
def test_user_errors_are_one_line_exit_1(case, expected, checkpoint, tmp_path, capsys):
    folder, _ = checkpoint("mixtral")
    text_file = tmp_path / "text.txt"
    context = "32"
    if case == "missing-text":
        text_file = tmp_path / "absent.txt"
    elif case == "short-text":
        text_file.write_text("import os\n")
    elif case == "long-context":
        text_file.write_text(CORPUS)
        context = "300"
    elif case == "empty-text":
        text_file.write_text("")
    code, out, err = run_cli(["perplexity", str(write_plan(tmp_path)), "--model", str(folder), "--text",
                              str(text_file), "--context", context, "--json"], capsys)
    assert code == 1 and out == ""
    assert expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
