"""Quantized experts, bad input: one-line errors naming what is wrong, exit code 1, nothing half-written.

`moeplan run` with a plan that disagrees with a quantized checkpoint, a corrupt, truncated or incomplete
quantized checkpoint, an unknown format; `moeplan quantize` with a bad group size, an existing output, an
already quantized or corrupt source.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from planner.cli import main

PLAN = """version: {version}
model: {{name: t, path: {path}, dtype: float32{experts}}}
hardware: {{accelerator: cpu, cpu_threads: 1}}
cache: {{slots: 1, policy: lru, preload: none}}
miss: {{compute: cpu, transfer_min_tokens: 0, promote: true}}
"""


def plan_file(tmp_path: Path, folder: Path, experts: str | None, version: int = 2) -> Path:
    plan = tmp_path / f"plan-{experts}-{version}.yaml"
    plan.write_text(PLAN.format(version=version, path=folder, experts=f", experts: {experts}" if experts else ""))
    return plan


def cli(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, err


def one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, err
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("moeplan ") and ": error: " in lines[-1], err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


@pytest.fixture(scope="module")
def quantized(checkpoint, tmp_path_factory):
    """The factory's Mixtral checkpoint (hidden 64, experts 96 wide) quantized to int4 by the CLI."""
    folder, _ = checkpoint("mixtral")
    out = tmp_path_factory.mktemp("q") / "mixtral-int4"
    assert main(["quantize", str(folder), "--experts", "int4", "--out", str(out), "--no-progress"]) == 0
    return out


def copy_of(folder: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_quantized_checkpoint_runs_with_its_format(quantized, tmp_path, capsys):
    code, err = cli(["run", str(plan_file(tmp_path, quantized, "int4")), "--max-new-tokens", "2"], capsys)
    assert code == 0, err
    assert "quantizing" not in err  # read as it is, not quantized again


@pytest.mark.parametrize("experts,version,needle", [
    ("int8", 2, "model.experts: the plan says int8 but"),
    ("bfloat16", 2, "model.experts: the plan says bfloat16 but"),
    (None, 2, "model.experts: the plan names none (so float32, its model.dtype) but"),
    (None, 1, "model.experts: the plan names none"),
])
def test_plan_that_disagrees_with_the_checkpoint(quantized, tmp_path, capsys, experts, version, needle):
    code, err = cli(["run", str(plan_file(tmp_path, quantized, experts, version))], capsys)
    one_line_error(code, err, needle, "holds int4 experts (group size 32")


def test_unknown_format_in_plan(quantized, tmp_path, capsys):
    code, err = cli(["run", str(plan_file(tmp_path, quantized, "int3"))], capsys)
    one_line_error(code, err, "model.experts: must be one of bfloat16, float16, float32, int8, int4, got 'int3'")


def test_float_experts_in_another_dtype_are_refused(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint("mixtral")
    code, err = cli(["run", str(plan_file(tmp_path, folder, "bfloat16"))], capsys)
    one_line_error(code, err, "model.experts: bfloat16 experts with model.dtype float32 are not supported")


def test_unknown_format_in_checkpoint(quantized, tmp_path, capsys):
    bad = copy_of(quantized, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["moeplan"]["experts"] = "int3"
    (bad / "config.json").write_text(json.dumps(config))
    code, err = cli(["run", str(plan_file(tmp_path, bad, "int4"))], capsys)
    one_line_error(code, err, "quantization_config.moeplan.experts: must be int8 or int4, got 'int3'")


def test_truncated_checkpoint(quantized, tmp_path, capsys):
    bad = copy_of(quantized, tmp_path)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])
    code, err = cli(["run", str(plan_file(tmp_path, bad, "int4"))], capsys)
    one_line_error(code, err, "corrupt safetensors file")


def test_corrupt_header(quantized, tmp_path, capsys):
    bad = copy_of(quantized, tmp_path)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\x00garbag"
    weights.write_bytes(bytes(data))
    code, err = cli(["run", str(plan_file(tmp_path, bad, "int4"))], capsys)
    one_line_error(code, err, "corrupt safetensors file")


def _rewrite(folder: Path, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_expert_tensor(quantized, tmp_path, capsys):
    bad = copy_of(quantized, tmp_path)
    name = "model.layers.1.block_sparse_moe.experts.5.w3.weight_scale"
    _rewrite(bad, lambda t: t.pop(name))
    code, err = cli(["run", str(plan_file(tmp_path, bad, "int4"))], capsys)
    one_line_error(code, err, f"quantized checkpoint incomplete: no tensor {name}")


def test_expert_tensor_of_the_wrong_shape_or_dtype(quantized, tmp_path, capsys):
    import torch

    bad = copy_of(quantized, tmp_path)
    name = "model.layers.0.block_sparse_moe.experts.2.w1.weight_packed"
    _rewrite(bad, lambda t: t.update({name: t[name][:, :4].contiguous()}))
    code, err = cli(["run", str(plan_file(tmp_path, bad, "int4"))], capsys)
    one_line_error(code, err, f"{name}: expected torch.int32 [96, 8], got torch.int32 [96, 4]")
    _rewrite(bad, lambda t: t.update({name: torch.zeros(96, 32, dtype=torch.uint8)}))
    code, err = cli(["run", str(plan_file(tmp_path, bad, "int4"))], capsys)
    one_line_error(code, err, f"{name}: expected torch.int32 [96, 8], got torch.uint8 [96, 32]")


def test_missing_dense_tensor(quantized, tmp_path, capsys):
    bad = copy_of(quantized, tmp_path)
    _rewrite(bad, lambda t: t.pop("model.layers.2.post_attention_layernorm.weight"))
    code, err = cli(["run", str(plan_file(tmp_path, bad, "int4"))], capsys)
    one_line_error(code, err, "quantized checkpoint incomplete: no tensor for model.layers.2.post_attention_layernorm")


def test_group_size_that_does_not_divide_at_load(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint("olmoe")  # experts 48 wide: 32 does not divide them
    code, err = cli(["run", str(plan_file(tmp_path, folder, "int4"))], capsys)
    one_line_error(code, err, "cannot quantize the experts at load with group size 32 does not divide",
                   "moeplan quantize --group-size N")


# ---- moeplan quantize -------------------------------------------------------------------------------
def test_quantize_refuses_to_overwrite(checkpoint, quantized, capsys):
    folder, _ = checkpoint("mixtral")
    before = sorted(p.name for p in quantized.iterdir())
    code, err = cli(["quantize", str(folder), "--experts", "int8", "--out", str(quantized)], capsys)
    one_line_error(code, err, "already exists; moeplan quantize never overwrites")
    assert sorted(p.name for p in quantized.iterdir()) == before


@pytest.mark.parametrize("group,needle", [("12", "--group-size: must be a multiple of 8"),
                                          ("64", "--group-size: 64 does not divide a matrix's input size 96")])
def test_quantize_bad_group_size(checkpoint, tmp_path, capsys, group, needle):
    folder, _ = checkpoint("mixtral")
    code, err = cli(["quantize", str(folder), "--experts", "int4", "--group-size", group,
                     "--out", str(tmp_path / "out")], capsys)
    one_line_error(code, err, needle)
    assert list(tmp_path.iterdir()) == []


def test_quantize_unknown_format_is_a_usage_error(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint("mixtral")
    with pytest.raises(SystemExit) as exc:
        main(["quantize", str(folder), "--experts", "int3", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2


def test_quantize_refuses_a_quantized_source(quantized, tmp_path, capsys):
    code, err = cli(["quantize", str(quantized), "--experts", "int8", "--out", str(tmp_path / "out")], capsys)
    one_line_error(code, err, "already quantized by moeplan quantize")


def test_quantize_of_a_corrupt_source_leaves_nothing(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint("mixtral")
    src = copy_of(folder, tmp_path)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out_parent = tmp_path / "outs"
    out_parent.mkdir()
    code, err = cli(["quantize", str(src), "--experts", "int4", "--out", str(out_parent / "q")], capsys)
    one_line_error(code, err, "corrupt safetensors file")
    assert list(out_parent.iterdir()) == []  # no DST, no temporary folder


def test_quantize_of_a_source_without_per_expert_tensors(checkpoint, tmp_path, capsys):
    folder, _ = checkpoint("mixtral")
    src = copy_of(folder, tmp_path)
    _rewrite(src, lambda t: t.pop("model.layers.0.block_sparse_moe.experts.0.w2.weight"))
    code, err = cli(["quantize", str(src), "--experts", "int4", "--out", str(tmp_path / "q")], capsys)
    one_line_error(code, err, "no tensor model.layers.0.block_sparse_moe.experts.0.w2.weight")
    assert not (tmp_path / "q").exists()
