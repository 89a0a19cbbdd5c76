"""`moeplan quantize`: write a checkpoint whose routed experts are int8 or int4, streaming, atomically.

SRC's safetensors files are read tensor by tensor and DST's written tensor by tensor: each output file's
header is computed first (every output tensor's dtype and shape follow from SRC's header and the format),
then each tensor is read, quantized if it is an expert matrix, and appended. Memory stays near one
expert matrix (and its float32 working copy) however big SRC is; the pages of SRC's memory-mapped files
are handed back to the kernel as they are read (runtime/mapped_pages.py).

Expert matrices are found by reverting transformers' own weight conversion (runtime/quant_checkpoint.py):
the per-expert tensors `save_pretrained` writes (Mixtral's `block_sparse_moe.experts.{e}.w1.weight`,
Qwen's `mlp.experts.{e}.gate_proj.weight`), quantized row by row (groups run along a row's inputs, so a
per-expert matrix quantizes exactly as the rows of the fused tensor do). DST names them as
compressed-tensors' pack-quantized (int4) and int-quantized (int8) checkpoints do; every other tensor is
copied unchanged, and so are the config (with a `quantization_config` that records the format and the
group size), the tokenizer and the other small files.

DST is written into a temporary folder beside it and renamed at the end; an existing DST is refused.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .contracts.expert_format import check_group_size, is_quantized
from .errors import ModelError, UserError
from .loader import check_model_dir, find_experts
from .mapped_pages import ReleaseMappedPages
from .quant_checkpoint import (checkpoint_format, expert_row_maps, expert_tensor_names, parameters_on_meta,
                               quantization_config)
from .quant_format import quantize

# safetensors' dtype names
_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
INDEX = "model.safetensors.index.json"
# weight files of other formats are not copied: DST is a safetensors checkpoint
SKIPPED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")


@dataclass
class QuantizeReport:
    matrices: int  # expert matrices quantized
    src_bytes: int  # bytes of SRC's safetensors files
    dst_bytes: int  # bytes of DST's safetensors files
    seconds: float


@dataclass
class _Out:
    """One output tensor: its name, dtype, shape, and how to make it from SRC."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    source: str  # the SRC tensor it comes from
    part: str  # "copy", "qweight", "scales" or "shape"

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty(0, dtype=self.dtype).element_size()


def quantize_checkpoint(src: str | Path, dst: str | Path, fmt: str, group_size: int,
                        progress: bool = True) -> QuantizeReport:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    start = time.perf_counter()
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not is_quantized(fmt):
        raise UserError(f"--experts: must be int8 or int4, got {fmt!r}")
    problem = check_group_size(group_size)
    if problem:
        raise UserError(f"--group-size: {problem}")
    config = check_model_dir(src)
    if checkpoint_format(config, str(src / "config.json")) is not None:
        raise ModelError(f"{src}: already quantized by moeplan quantize; quantize the plain checkpoint")
    if isinstance(config.get("quantization_config"), dict):
        raise ModelError(f"{src}: already quantized ({config['quantization_config'].get('quant_method')!r}); "
                         f"moeplan quantize reads plain float checkpoints")
    if dst.exists() or dst.is_symlink():
        raise UserError(f"--out {dst}: already exists; moeplan quantize never overwrites (remove it or choose "
                        f"another folder)")
    if not dst.parent.is_dir():
        raise UserError(f"--out {dst}: the folder {dst.parent} does not exist")

    # which SRC tensors are expert matrices, and what each becomes
    try:
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    except Exception as exc:
        raise ModelError(f"{src}: cannot build the model from config.json ({str(exc).splitlines()[0][:300]})") from None
    experts, _ = find_experts(model)
    if not experts:
        raise ModelError(f"{src}: model type {config.get('model_type')!r} has no experts module moeplan can run")
    expert_inputs: dict[str, int] = {}  # SRC name of an expert matrix -> its input size K
    for module, per_projection in zip(experts, expert_row_maps(model, experts)):
        for p, entries in per_projection.items():
            k = getattr(module, p).shape[-1]
            problem = check_group_size(group_size, k)
            if problem:
                raise UserError(f"--group-size: {problem} ({p} of {type(module).__name__})")
            for base, _rows in entries:
                expert_inputs[f"{base}.weight"] = k
    del model, experts

    files = sorted(src.glob("*.safetensors"))
    plans: dict[str, list[_Out]] = {}
    found: set[str] = set()
    ignore: set[str] = set()
    src_bytes = 0
    try:
        for f in files:
            src_bytes += f.stat().st_size
            outs = []
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    sl = handle.get_slice(key)
                    dtype, shape = _ST_DTYPES.get(sl.get_dtype()), tuple(sl.get_shape())
                    if dtype is None:
                        raise ModelError(f"{f}: {key}: dtype {sl.get_dtype()} is not supported")
                    if key in expert_inputs:
                        found.add(key)
                        outs += _expert_outputs(key, shape, dtype, fmt, group_size, expert_inputs[key], f)
                    else:
                        outs.append(_Out(key, dtype, shape, key, "copy"))
                        if key.endswith(".weight") and len(shape) == 2:
                            ignore.add(key[:-len(".weight")])
            plans[f.name] = outs
    except (ModelError, UserError):
        raise
    except Exception as exc:  # safetensors' own error type for a corrupt file
        raise ModelError(f"{src}: corrupt safetensors file ({str(exc).splitlines()[0][:300]})") from None
    missing = sorted(set(expert_inputs) - found)
    if missing:
        raise ModelError(f"{src}: no tensor {missing[0]} (moeplan quantize reads the per-expert tensors "
                         f"transformers' save_pretrained writes){f'; {len(missing) - 1} more missing' if len(missing) > 1 else ''}")

    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        total = sum(o.nbytes for outs in plans.values() for o in outs if o.part == "copy") + \
            sum(sl_bytes for sl_bytes in _expert_source_bytes(files, expert_inputs))
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"quantize {fmt}", disable=not progress)
        weight_map: dict[str, str] = {}
        matrices = 0
        with ReleaseMappedPages(src), bar:
            for f in files:
                matrices += _write_file(f, tmp / f.name, plans[f.name], fmt, group_size, bar)
                weight_map.update({o.name: f.name for o in plans[f.name]})
        dst_bytes = sum((tmp / f.name).stat().st_size for f in files)
        if (src / INDEX).is_file() or len(files) > 1:
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": dst_bytes}, "weight_map": weight_map},
                                                indent=2) + "\n", encoding="utf-8")
        _copy_small_files(src, tmp)
        config["quantization_config"] = quantization_config(fmt, group_size, sorted(ignore))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            os.rename(tmp, dst)  # fails if DST appeared meanwhile: never replaces it
        except OSError as exc:
            raise UserError(f"--out {dst}: cannot rename the finished checkpoint there ({exc.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return QuantizeReport(matrices, src_bytes, dst_bytes, time.perf_counter() - start)


def _expert_outputs(key: str, shape: tuple[int, ...], dtype: torch.dtype, fmt: str, group_size: int,
                    inputs: int, f: Path) -> list[_Out]:
    if len(shape) != 2 or shape[1] != inputs or not dtype.is_floating_point:
        raise ModelError(f"{f}: {key}: expected a float matrix with {inputs} inputs, got {dtype} {list(shape)}")
    rows = shape[0]
    base = key[:-len(".weight")]
    qname, sname = expert_tensor_names(fmt, base)
    outs = [_Out(qname, torch.int32, (rows, inputs // 8), key, "qweight") if fmt == "int4"
            else _Out(qname, torch.int8, (rows, inputs), key, "qweight"),
            _Out(sname, torch.float16, (rows, inputs // group_size), key, "scales")]
    if fmt == "int4":
        outs.append(_Out(f"{base}.weight_shape", torch.int64, (2,), key, "shape"))
    return outs


def _expert_source_bytes(files: list[Path], expert_inputs: dict[str, int]) -> list[int]:
    """Bytes of SRC's expert matrices (the progress bar counts SRC bytes processed)."""
    from safetensors import safe_open

    out = []
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                if key in expert_inputs:
                    sl = handle.get_slice(key)
                    n = 1
                    for d in sl.get_shape():
                        n *= d
                    out.append(n * torch.empty(0, dtype=_ST_DTYPES[sl.get_dtype()]).element_size())
    return out


def _write_file(src_file: Path, out_file: Path, outs: list[_Out], fmt: str, group_size: int, bar) -> int:
    """Write one output safetensors file: header, then each tensor in order; returns matrices quantized."""
    from safetensors import safe_open

    header: dict[str, object] = {"__metadata__": {"format": "pt", "moeplan_experts": fmt,
                                                  "moeplan_group_size": str(group_size)}}
    offset = 0
    for o in outs:
        header[o.name] = {"dtype": _ST_NAMES[o.dtype], "shape": list(o.shape), "data_offsets": [offset, offset + o.nbytes]}
        offset += o.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # tensors start 8-byte aligned
    matrices = 0
    with safe_open(str(src_file), framework="pt") as handle, open(out_file, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        pending: dict[str, torch.Tensor] = {}  # the quantized parts of the matrix being written
        for o in outs:
            if o.part == "copy":
                t = handle.get_tensor(o.source)
                bar.update(o.nbytes)
            elif o.part == "qweight":
                w = handle.get_tensor(o.source)
                q, s = quantize(w, fmt, group_size)
                bar.update(w.numel() * w.element_size())
                del w
                pending = {"scales": s, "shape": torch.tensor([q.shape[0], o.shape[1] * (8 if fmt == "int4" else 1)])}
                t = q.view(torch.int32) if fmt == "int4" else q
                matrices += 1
            else:
                t = pending.pop(o.part)
            if t.dtype != o.dtype or tuple(t.shape) != o.shape:
                raise AssertionError(f"{o.name}: made {t.dtype} {list(t.shape)}, header says {o.dtype} {list(o.shape)}")
            out.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out.flush()
    return matrices


def _copy_small_files(src: Path, dst: Path) -> None:
    """Config, tokenizer, generation config and the other small files (weights of other formats are not
    copied: DST reads from safetensors only)."""
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.endswith(SKIPPED_SUFFIXES) and path.name not in (INDEX, "config.json"):
            shutil.copy2(path, dst / path.name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
