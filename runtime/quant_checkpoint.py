"""Checkpoints with int8/int4 experts (written by `moeplan quantize`): their names, marker and loading.

Layout (compressed-tensors' naming, so that the bytes and names are those llm-compressor writes and vLLM
reads; moeplan reads it without that library, and tests/runtime/test_quant_checkpoint_compat.py checks
that compressed-tensors' own config model and compressors read it: every expert matrix decompresses to
exactly moeplan's dequantization. Loading by vLLM is not tested here):
- every tensor but the routed experts' weights: as in the source checkpoint (names, dtypes, values);
- each routed expert matrix under its source name (`model.layers.0.block_sparse_moe.experts.3.w1`, as
  transformers' `save_pretrained` writes it, found by reverting transformers' own weight conversion):
  int4 (`pack-quantized`): `{name}.weight_packed` int32 [N, K/8] (eight codes q + 8 per word, value i in
  bits 4i..4i+3: the uint8 [N, K/2] layout of runtime/contracts/expert_format.py read as little-endian
  int32), `{name}.weight_scale` float16 [N, K/G], `{name}.weight_shape` int64 [N, K];
  int8 (`int-quantized`): `{name}.weight` int8 [N, K], `{name}.weight_scale` float16 [N, K/G];
- config.json's `quantization_config`: compressed-tensors' fields (quant_method, format, one config group
  of symmetric int weights with the group strategy and size; routers and the dense part ignored, as
  they are stored unchanged) and `moeplan: {experts, group_size, version}`, which is what moeplan reads.

Loading builds the model with its parameters on the meta device (no memory), reads the dense tensors
into it (`load_state_dict(assign=True)`: nothing is allocated twice; the keys renamed as transformers
renames them on load) and each layer's quantized experts into fused [E, N, ...] tensors, row by row as
the reverted conversion maps them: bf16 experts are never built, and memory stays near the quantized
checkpoint's size.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from . import huge_pages
from .contracts.expert_format import (FORMATS, check_group_size, is_quantized, qweight_columns)
from .errors import ModelError
from .quant_experts import QuantizedExperts, attach, projection_names

log = logging.getLogger(__name__)

MARKER = "moeplan"  # the key of quantization_config that moeplan reads
LAYOUT_VERSION = 1
CT_FORMAT = {"int4": "pack-quantized", "int8": "int-quantized"}


# ---- the marker in config.json ------------------------------------------------------------------
def quantization_config(fmt: str, group_size: int, ignore: list[str]) -> dict[str, Any]:
    """config.json's `quantization_config` for a checkpoint with `fmt` experts."""
    bits = 4 if fmt == "int4" else 8
    return {
        "quant_method": "compressed-tensors",
        "format": CT_FORMAT[fmt],
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"], "format": CT_FORMAT[fmt], "input_activations": None, "output_activations": None,
            "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax"}}},
        "ignore": ignore,
        MARKER: {"experts": fmt, "group_size": group_size, "version": LAYOUT_VERSION},
    }


def checkpoint_format(config: dict[str, Any], where: str) -> tuple[str, int] | None:
    """(format, group size) of a checkpoint written by `moeplan quantize`, None for any other checkpoint."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or MARKER not in qc:
        return None
    m = qc[MARKER]
    if not isinstance(m, dict):
        raise ModelError(f"{where}: quantization_config.{MARKER}: must be a mapping, got {m!r}"[:300])
    fmt = m.get("experts")
    if fmt not in FORMATS or not is_quantized(fmt):
        raise ModelError(f"{where}: quantization_config.{MARKER}.experts: must be int8 or int4, got {fmt!r}"[:300])
    problem = check_group_size(m.get("group_size"))
    if problem:
        raise ModelError(f"{where}: quantization_config.{MARKER}.group_size: {problem}")
    if m.get("version") != LAYOUT_VERSION:
        raise ModelError(f"{where}: quantization_config.{MARKER}.version: this moeplan reads layout version "
                         f"{LAYOUT_VERSION}, got {m.get('version')!r}"[:300])
    return fmt, m["group_size"]


# ---- where each fused expert row lives in the checkpoint ------------------------------------------
def expert_row_maps(model: torch.nn.Module, experts: list[torch.nn.Module]) -> list[dict[str, list[tuple[str, torch.Tensor]]]]:
    """For each experts module (model order) and projection: [(checkpoint name without `.weight`, rows)],
    `rows` the indices into the fused [E * N] rows that the checkpoint matrix holds, in its row order.

    transformers' own reverse conversion (what `save_pretrained` writes) is run on label tensors, one
    column whose values number every fused row of every module uniquely, so the mapping is the
    library's, whatever the family, and each reverted tensor says which fused rows it holds."""
    from transformers.core_model_loading import revert_weight_conversion

    name_of = {id(m): n for n, m in model.named_modules()}
    labels: dict[str, torch.Tensor] = {}
    spans: list[tuple[int, int, int, str]] = []  # (first label, last label + 1, module index, projection)
    offset = 0
    for i, module in enumerate(experts):
        if getattr(module, "is_transposed", False):
            raise ModelError(f"{type(module).__name__}: experts stored transposed are not supported in "
                             f"quantized checkpoints")
        for p in projection_names(module):
            e, n = getattr(module, p).shape[:2]
            labels[f"{name_of[id(module)]}.{p}"] = torch.arange(offset, offset + e * n).reshape(e, n, 1)
            spans.append((offset, offset + e * n, i, p))
            offset += e * n
    reverted = revert_weight_conversion(model, dict(labels))
    maps: list[dict[str, list[tuple[str, torch.Tensor]]]] = [
        {p: [] for p in projection_names(m)} for m in experts]
    for key, t in reverted.items():
        if key in labels or t.dim() != 2 or t.shape[1] != 1 or not t.numel():
            raise ModelError(f"{key}: transformers' conversion of the experts is not a split of rows; "
                             f"moeplan cannot map it to a quantized checkpoint")
        first = int(t[0, 0])
        lo, _hi, i, p = next(span for span in spans if span[0] <= first < span[1])
        base = key[:-len(".weight")] if key.endswith(".weight") else key
        maps[i][p].append((base, t.flatten() - lo))
    for i, module in enumerate(experts):
        for p, entries in maps[i].items():
            e, n = getattr(module, p).shape[:2]
            covered = torch.cat([rows for _, rows in entries]).unique().numel() if entries else 0
            if covered != e * n:
                raise ModelError(f"{name_of[id(module)]}.{p}: cannot map the fused expert rows to checkpoint "
                                 f"names ({covered} of {e * n} rows found)")
            entries.sort(key=lambda item: _natural(item[0]))
    return maps


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def expert_tensor_names(fmt: str, base: str) -> tuple[str, str]:
    """(qweight name, scales name) of one checkpoint expert matrix."""
    return (f"{base}.weight_packed" if fmt == "int4" else f"{base}.weight"), f"{base}.weight_scale"


# ---- building a model on the meta device and loading it --------------------------------------------
@contextlib.contextmanager
def parameters_on_meta():
    """Parameters created inside are on the meta device (no memory); buffers (rotary tables) are real."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def load_quantized(folder: Path, config_dict: dict[str, Any], dtype: torch.dtype, fmt: str, group_size: int,
                   build_model, find_experts) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """The model of a quantized checkpoint folder: dense tensors as stored (in `dtype`), experts quantized.
    `build_model(config)` makes the model (with parameters on the meta device), `find_experts(model)`
    lists its experts modules."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # read here, by moeplan, not by a transformers quantizer
    with parameters_on_meta():
        model = build_model(config)
    experts, _ = find_experts(model)
    if not experts:
        raise ModelError(f"{folder}: the model has no experts module moeplan can run")
    maps = expert_row_maps(model, experts)

    files = sorted(folder.glob("*.safetensors"))
    where: dict[str, Path] = {}
    handles = {}
    try:
        for f in files:
            handles[f] = safe_open(str(f), framework="pt")
            for key in handles[f].keys():
                where[key] = f
    except Exception as exc:  # safetensors raises its own error type for a corrupt or truncated file
        raise ModelError(f"{folder}: corrupt safetensors file ({_first_line(exc)})") from None

    def read(name: str, want_dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        f = where.get(name)
        if f is None:
            raise ModelError(f"{folder}: quantized checkpoint incomplete: no tensor {name}")
        try:
            t = handles[f].get_tensor(name)
        except Exception as exc:
            raise ModelError(f"{f}: corrupt safetensors file: cannot read {name} ({_first_line(exc)})") from None
        if t.dtype != want_dtype or tuple(t.shape) != shape:
            raise ModelError(f"{f}: {name}: expected {want_dtype} {list(shape)}, got {t.dtype} {list(t.shape)}")
        return t

    expert_keys: set[str] = set()
    for module, per_projection in zip(experts, maps):
        qweight, scales = {}, {}
        for p, entries in per_projection.items():
            e, n, k = getattr(module, p).shape
            problem = check_group_size(group_size, k)
            if problem:
                raise ModelError(f"{folder}: {p}: group size {problem}")
            cols, groups = qweight_columns(fmt, k), k // group_size
            qdtype = torch.uint8 if fmt == "int4" else torch.int8
            qw = huge_pages.empty((e * n, cols), qdtype)
            sc = huge_pages.empty((e * n, groups), torch.float16)
            for base, rows in entries:
                qname, sname = expert_tensor_names(fmt, base)
                expert_keys.update((qname, sname))
                if fmt == "int4":
                    packed = read(qname, torch.int32, (len(rows), k // 8))
                    qw[rows] = packed.view(torch.uint8)
                    shape_name = f"{base}.weight_shape"
                    expert_keys.add(shape_name)
                    recorded = read(shape_name, torch.int64, (2,)).tolist()
                    if recorded != [len(rows), k]:
                        raise ModelError(f"{where[shape_name]}: {shape_name}: expected {[len(rows), k]}, got {recorded}")
                else:
                    qw[rows] = read(qname, torch.int8, (len(rows), k))
                sc[rows] = read(sname, torch.float16, (len(rows), groups))
            qweight[p], scales[p] = qw.view(e, n, cols), sc.view(e, n, groups)
        attach(module, QuantizedExperts(fmt, group_size, projection_names(module), qweight, scales))

    # the dense part: every other tensor, renamed as transformers renames it when it loads
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    meta_state = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, f in where.items():
        if key in expert_keys:
            continue
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
        if target not in meta_state and key in meta_state:
            target, pattern = key, None
        if pattern is not None or target not in meta_state:
            raise ModelError(f"{f}: unexpected tensor {key} in a quantized checkpoint")
        t = handles[f].get_tensor(key)
        want = meta_state[target]
        if tuple(t.shape) != tuple(want.shape):
            raise ModelError(f"{f}: {key}: expected shape {list(want.shape)}, got {list(t.shape)}")
        state[target] = t.to(want.dtype) if t.is_floating_point() else t
    handles.clear()
    model.load_state_dict(state, strict=False, assign=True)
    del state
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelError(f"{folder}: quantized checkpoint incomplete: no tensor for {missing[0]}"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
    return model, experts


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))
