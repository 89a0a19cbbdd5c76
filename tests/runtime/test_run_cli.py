"""`moeplan run`: the --json contract, streaming, and one-line user errors with exit code 1."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from planner.cli import main

PLAN = """version: 1
model: {{name: t, path: {path}, dtype: float32}}
hardware: {{accelerator: {acc}, cpu_threads: 1}}
cache: {{slots: {slots}, policy: lru, preload: none}}
miss: {{compute: cpu, transfer_min_tokens: 0, promote: true}}
prefetch: {{lookahead: 0}}
"""


def write_plan(tmp_path: Path, path="unused", acc="cpu", slots="1") -> Path:
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN.format(path=path, acc=acc, slots=slots))
    return plan


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test's own set-up printed
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_json_contract_in_a_real_process(checkpoint, tmp_path):
    folder, _ = checkpoint("mixtral")
    plan = write_plan(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "run", str(plan), "--model", str(folder),
                           "--prompt", "def main", "--max-new-tokens", "5", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, "stdout carries exactly one JSON object"
    out = json.loads(lines[0])
    for key in ("generated_ids", "text", "prompt_tokens", "prefill_seconds", "decode_tokens_per_s"):
        assert key in out
    assert set(out["cache"]) >= {"hits", "misses", "hit_rate", "per_layer"}
    assert 1 <= len(out["generated_ids"]) <= 5


def test_text_streams_to_stdout_and_summary_to_stderr(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint("mixtral")
    code, out, err = run_cli(["run", str(write_plan(tmp_path, path=str(folder))), "--max-new-tokens", "4"], capsys)
    assert code == 0
    assert "tokens/s" in err and "hit rate" in err and "tokens/s" not in out


def test_same_seed_same_tokens_whatever_the_plan(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint("mixtral")
    runs = []
    for slots in ("0", "8"):
        code, out, _ = run_cli(["run", str(write_plan(tmp_path, slots=slots)), "--model", str(folder), "--json",
                                "--temperature", "0.9", "--top-p", "0.9", "--seed", "7", "--max-new-tokens", "6"],
                               capsys)
        assert code == 0
        runs.append(json.loads(out)["generated_ids"])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("case,expected", [
    ("cuda", "hardware.accelerator: the plan asks for cuda:0 but this host has no CUDA"),
    ("missing", "no such model folder"),
    ("no-config", "no config.json"),
    ("corrupt", "corrupt safetensors file"),
    ("slots-list", "cache.slots: has 2 entries but the model has 3 MoE layers"),
    ("too-many-slots", "cache.slots: 9 slots but the model has only 8 experts"),
    ("dense-model", "no experts module that uses transformers' experts interface"),
    ("plan-missing", "no such plan file"),
])
def test_user_errors_are_one_line_exit_1(case, expected, checkpoint, tmp_path, capsys):
    import shutil

    folder, _ = checkpoint("mixtral")
    model, slots, acc = str(folder), "1", "cpu"
    if case == "cuda":
        acc = "cuda:0"
    elif case == "missing":
        model = str(tmp_path / "nowhere")
    elif case == "no-config":
        model = str(tmp_path)
    elif case in ("corrupt",):
        broken = tmp_path / "broken"
        shutil.copytree(folder, broken)
        weights = next(broken.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:1000])
        model = str(broken)
    elif case == "slots-list":
        slots = "[1, 2]"
    elif case == "too-many-slots":
        slots = "9"
    elif case == "dense-model":
        model = str(make_dense_checkpoint(tmp_path / "dense"))
    plan = write_plan(tmp_path, acc=acc, slots=slots)
    if case == "plan-missing":
        plan = tmp_path / "absent.yaml"
    code, out, err = run_cli(["run", str(plan), "--model", model, "--max-new-tokens", "2"], capsys)
    assert code == 1
    assert expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def make_dense_checkpoint(folder: Path) -> Path:
    import transformers as tf

    from model_factory import make_tokenizer

    config = tf.LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    make_tokenizer(folder)
    return folder


def test_bad_usage_is_exit_2(tmp_path):
    with pytest.raises(SystemExit) as err:
        main(["run", str(write_plan(tmp_path)), "--temperature", "-1"])
    assert err.value.code == 2
