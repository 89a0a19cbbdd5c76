"""int8 and int4 experts, every family, a spread of plans: `run` gives exactly the tokens of a reference that
dequantizes the same experts into the model dtype and runs plain transformers.

Two sources of quantized experts per family and format: a plain checkpoint quantized at load (the
reference quantizes the plain weights with the same rule and dequantizes them), and a checkpoint written
by `moeplan quantize` (the reference reads its tensors here, with its own unpacking of the compressed-
tensors int32 words, and writes a plain dequantized checkpoint that transformers loads as usual).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from model_factory import FAMILIES, build_checkpoint, num_experts
from quant_reference import GROUP, QUANTIZABLE, reference_gaps, reference_model
from runtime.plan import Plan
from runtime.quantize import quantize_checkpoint
from runtime.session import Session

# bench/device_check.sh runs this file with MOEPLAN_TEST_ACCELERATOR=cuda:0 on a GPU machine
ACCELERATOR = os.environ.get("MOEPLAN_TEST_ACCELERATOR", "cpu")
# on the CPU the tokens are the reference's exactly; a GPU's float32 matmuls round otherwise, so there a
# token may be off the reference's argmax by this much of a logit (as in test_conformance.py)
TOL = 0.0 if ACCELERATOR == "cpu" else 1e-3
PROMPT = "def main(argv):\n    for name in"
NEW_TOKENS = 5
LAYERS = 3

# Together: no slots and slots, every policy, misses on the CPU and on the accelerator, the prefill's
# transfers, promotions and prefetch copies (all of them moving quantized bytes).
PLANS = {
    "no-slots-cpu": dict(slots=0, policy="lru"),
    "lru-promote-prefetch": dict(slots=2, policy="lru", promote=True, lookahead=1),
    "lfu-accelerator": dict(slots=3, policy="lfu", preload=True, compute="accelerator"),
    "fifo-transfer-promote": dict(slots=1, policy="fifo", transfer_min_tokens=2, promote=True),
    "static-cpu": dict(slots=2, policy="static", preload=True),
    "adaptive-promote": dict(slots=2, policy="adaptive", promote=True),
}


def make_plan(spec: dict, fmt: str, experts: int) -> Plan:
    slots = spec["slots"]
    preload = [list(range(experts - 1, experts - 1 - slots, -1))] * LAYERS if spec.get("preload") else "none"
    return Plan.from_dict({
        "version": 2,
        "model": {"name": "test", "dtype": "float32", "experts": fmt},
        "hardware": {"accelerator": ACCELERATOR, "cpu_threads": 1},  # (2 threads: no other path, 10x slower here)
        "cache": {"slots": slots, "policy": spec["policy"], "preload": preload},
        "miss": {"compute": spec.get("compute", "cpu"), "transfer_min_tokens": spec.get("transfer_min_tokens", 0),
                 "promote": spec.get("promote", False)},
        "prefetch": {"lookahead": spec.get("lookahead", 0)},
    })


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """family -> (plain checkpoint folder, config), built once for this file."""
    built: dict[str, tuple[Path, object]] = {}

    def get(family: str):
        if family not in built:
            folder = tmp_path_factory.mktemp(f"plain-{family}")
            built[family] = (folder, build_checkpoint(family, folder, seed=11 + len(built), layers=LAYERS,
                                                      **QUANTIZABLE.get(family, {})))
        return built[family]

    return get


def unpack_compressed_tensors(packed: torch.Tensor) -> torch.Tensor:
    """int32 [N, K/8] (value i of each word in bits 4i..4i+3, offset 8) -> int codes [N, K]: written here
    from the compressed-tensors description, independently of runtime/quant_format.py."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    values = [((words >> (4 * i)) & 0xF) - 8 for i in range(8)]
    return torch.stack(values, dim=-1).reshape(packed.shape[0], -1)


def dequantized_copy(quantized: Path, out: Path) -> Path:
    """A plain float32 checkpoint with the quantized checkpoint's experts dequantized (the reference's)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir()
    config = json.loads((quantized / "config.json").read_text())
    group = config.pop("quantization_config")["moeplan"]["group_size"]
    (out / "config.json").write_text(json.dumps(config))
    for f in quantized.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy(f, out / f.name)
    tensors = {}
    with safe_open(str(quantized / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
        for key in keys:
            if key.endswith((".weight_scale", ".weight_shape")):
                continue
            t = handle.get_tensor(key)
            if key.endswith(".weight_packed"):
                base = key[:-len(".weight_packed")]
                q = unpack_compressed_tensors(t)
            elif f"{key}_scale" in keys:  # int8: `{base}.weight` beside `{base}.weight_scale`
                base = key[:-len(".weight")]
                q = t.to(torch.int64)
            else:
                tensors[key] = t.float() if t.is_floating_point() else t
                continue
            scale = handle.get_tensor(f"{base}.weight_scale").float().repeat_interleave(group, dim=1)
            tensors[f"{base}.weight"] = (q.float() * scale).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_plans_match_the_dequantized_reference(family, fmt, plain, tmp_path):
    folder, config = plain(family)
    experts = num_experts(config)
    written = tmp_path / "quantized"
    quantize_checkpoint(folder, written, fmt, GROUP, progress=False)
    sources = {"at-load": (folder, reference_model(folder, fmt, torch.float32)),
               "moeplan-quantize": (written, reference_model(dequantized_copy(written, tmp_path / "ref"), None,
                                                             torch.float32))}
    for source, (model_dir, reference) in sources.items():
        loaded = None
        for name, spec in PLANS.items():
            plan = make_plan(spec, fmt, experts)
            if loaded is None:  # loaded once per source (as `run` loads), then each plan's engine on it
                session = Session.load(plan, model_dir)
                loaded = session.loaded
                assert loaded.experts_format == fmt and loaded.group_size == GROUP
            else:
                session = Session(loaded, plan)
            result = session.generate(PROMPT, max_new_tokens=NEW_TOKENS)
            prompt_ids = list(session.loaded.tokenizer(PROMPT)["input_ids"])
            gaps = reference_gaps(reference, prompt_ids, result.generated_ids)
            assert max(gaps) <= TOL, f"{family}/{fmt}/{source}/{name}: a token off the reference by {max(gaps):.3g}"
            stats = result.stats
            if spec["slots"] == 0:
                assert stats["cache"]["hits"] == 0
            if spec.get("compute") == "accelerator":
                assert stats["cpu_misses"] == 0
            if spec.get("promote") or spec.get("compute") == "accelerator":
                # the bytes moved into slots are the quantized expert's
                store = session.engine.layers[0].store
                assert store.quantized is not None and store.slots[0].dtype in (torch.int8, torch.uint8)
                assert stats["bytes_to_accelerator"] % store.expert_bytes == 0


def test_quantized_checkpoint_holds_no_float_experts_and_slots_hold_quantized_bytes(plain, tmp_path):
    folder, config = plain("mixtral")
    written = tmp_path / "q4"
    quantize_checkpoint(folder, written, "int4", GROUP, progress=False)
    session = Session.load(make_plan(PLANS["lru-promote-prefetch"], "int4", num_experts(config)), written)
    for module in session.loaded.experts:
        assert not hasattr(module, "gate_up_proj") and not hasattr(module, "down_proj")
    assert all(p.device == session.loaded.device for p in session.loaded.model.parameters())
    store = session.engine.layers[0].store
    h, i = config.hidden_size, config.intermediate_size
    assert store.expert_bytes == (2 * i * h // 2 + 2 * 2 * i * h // GROUP) + (h * i // 2 + 2 * h * i // GROUP)
    assert [t.dtype for t in store.host] == [torch.uint8, torch.float16, torch.uint8, torch.float16]
    # the memory guard and the planner count what the runtime holds (runtime/contracts/memory.py)
    from runtime.loader import inspect_model

    for model_dir in (written, folder):  # as written by moeplan quantize, and quantized at load
        shape = inspect_model(model_dir, "float32", "int4")
        assert shape.expert_bytes == store.expert_bytes
        assert shape.expert_bytes_total == sum(layer.store.quantized.nbytes() for layer in session.engine.layers)
