"""Load a local Hugging Face MoE checkpoint: dense weights on the accelerator, routed experts in host memory.

transformers builds the model and reads the safetensors files (converting per-expert tensors into the
fused `gate_up_proj [E, 2I, H]` / `down_proj [E, H, I]` layout as it goes). Loading happens on the CPU;
then every parameter that is not a routed expert moves to the accelerator, and the experts stay where
they are (the engine page-locks them in place on a CUDA plan, runtime/device.py, so that a copy into a
cache slot is one DMA). Experts are never all put on the accelerator, and the host never holds two full
copies of them.

int8/int4 experts (a plan's `model.experts`): a checkpoint written by `moeplan quantize` loads as it is
(runtime/quant_checkpoint.py: the model is built on the meta device and filled, no float experts are
ever built); with a plain checkpoint the experts are quantized while loading, layer by layer
(runtime/quant_experts.py), and the float ones freed.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .contracts.expert_format import DEFAULT_GROUP_SIZE, check_group_size, is_quantized
from .contracts.model_shape import ModelShape, shape_from_config
from .errors import HardwareError, ModelError, PlanError
from .experts_hook import IMPLEMENTATION_NAME, register
from .mapped_pages import ReleaseMappedPages
from .quant_checkpoint import checkpoint_format, load_quantized
from .quant_experts import ATTRIBUTE as QUANTIZED_ATTRIBUTE, quantize_at_load, quantized_of

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    experts: list[torch.nn.Module]  # the routed-experts modules, one per MoE layer, in model order
    routers: list[torch.nn.Module | None]  # each MoE layer's router (for prefetch guesses), if found
    device: torch.device
    model_dir: Path
    experts_format: str = ""  # how the routed experts are held: the dtype, int8 or int4
    group_size: int = 0  # inputs per scale of int8/int4 experts (0 for float experts)


def resolve_device(accelerator: str) -> torch.device:
    """The plan's `hardware.accelerator` as a torch device, checked against this host."""
    if accelerator == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise HardwareError(f"hardware.accelerator: the plan asks for {accelerator} but this host has no CUDA "
                            f"device (torch {torch.__version__}); use a plan with accelerator: cpu")
    device = torch.device(accelerator)
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise HardwareError(f"hardware.accelerator: {accelerator} does not exist "
                            f"(this host has {torch.cuda.device_count()} CUDA devices)")
    return torch.device("cuda", index)


def is_experts_module(module: torch.nn.Module) -> bool:
    """A routed-experts module prepared by transformers' `use_experts_implementation` decorator (its float
    weights, or the quantized ones in their place)."""
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and (
        hasattr(module, "down_proj") or hasattr(module, QUANTIZED_ATTRIBUTE))


@dataclass(frozen=True)
class ExpertSource:
    """How `run` gets the routed experts in the plan's format from this checkpoint."""
    fmt: str  # the plan's expert format (model.experts, or model.dtype)
    group_size: int  # int formats: the checkpoint's, or the default when quantized at load; else 0
    in_checkpoint: bool  # True: the checkpoint holds them so (float, or written by `moeplan quantize`)


def expert_source(folder: Path, config: dict, dtype: str, experts: str | None) -> ExpertSource:
    """Check the plan's expert format against the checkpoint's, before any weight is read."""
    fmt = experts or dtype
    stored = checkpoint_format(config, str(folder / "config.json"))
    if stored is not None:
        if fmt != stored[0]:
            said = f"model.experts: the plan says {fmt}" if experts else \
                f"model.experts: the plan names none (so {dtype}, its model.dtype)"
            raise PlanError(f"{said} but {folder} holds {stored[0]} experts (group size {stored[1]}, written by "
                            f"moeplan quantize); set model.experts: {stored[0]} or use the plain checkpoint")
        return ExpertSource(fmt, stored[1], True)
    if is_quantized(fmt):
        return ExpertSource(fmt, DEFAULT_GROUP_SIZE, False)
    if fmt != dtype:
        raise PlanError(f"model.experts: {fmt} experts with model.dtype {dtype} are not supported by run: "
                        f"use model.dtype, int8 or int4")
    return ExpertSource(fmt, 0, True)


def check_model_dir(model_dir: Path) -> dict:
    """Fail early, with one line, on a folder that cannot be a checkpoint; return its config."""
    if not model_dir.exists():
        raise ModelError(f"{model_dir}: no such model folder")
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: not a folder (expected a Hugging Face checkpoint folder)")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{model_dir}: no config.json (expected a Hugging Face checkpoint folder)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ModelError(f"{config_path}: not valid JSON (nested too deeply)") from None
    except OSError as exc:
        raise ModelError(f"{config_path}: cannot read ({exc.strerror})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelError(f"{config_path}: no model_type (not a transformers config)")
    if not list(model_dir.glob("*.safetensors")):
        raise ModelError(f"{model_dir}: no *.safetensors weights (moeplan reads safetensors only)")
    return config


def inspect_model(model_dir: str | Path, dtype: str, experts: str | None = None) -> ModelShape:
    """The model's shape in `dtype`, its experts in the plan's format `experts` (None: dtype), checked
    before any weight is read: transformers builds the model on the meta device (no memory, no weights
    read) to show it has an experts module moeplan can run, and the shape is read from the same
    config.json (runtime/contracts/model_shape.py, the planner's too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(model_dir).expanduser()
    source = expert_source(folder, check_model_dir(folder), dtype, experts)
    register()
    try:
        config = AutoConfig.from_pretrained(folder)
        if hasattr(config, "quantization_config") and source.in_checkpoint and is_quantized(source.fmt):
            del config.quantization_config  # moeplan's own layout, read by moeplan
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    except Exception as exc:  # an unknown model_type, a config transformers rejects
        raise ModelError(f"{folder}: cannot build the model from config.json ({_first_line(exc)})") from None
    experts, _ = find_experts(model)
    if not experts:
        raise ModelError(f"{folder}: model type {config.model_type!r} has no experts module that uses "
                         f"transformers' experts interface, so moeplan cannot run it")
    shape = shape_from_config(folder / "config.json").with_dtype(dtype)
    if is_quantized(source.fmt):
        shape = shape.with_experts(source.fmt, source.group_size)
        for inputs in (shape.hidden, shape.expert_intermediate):
            problem = check_group_size(source.group_size, inputs)
            if problem and not source.in_checkpoint:
                raise ModelError(f"{folder}: cannot quantize the experts at load with group size {problem}; "
                                 f"write a quantized checkpoint with `moeplan quantize --group-size N`")
            if problem:
                raise ModelError(f"{folder}: quantization_config: group size {problem}")
    if (shape.num_moe_layers, shape.num_experts) != (len(experts), experts[0].num_experts):
        raise ModelError(f"{folder}: config.json reads as {shape.num_moe_layers} MoE layers of {shape.num_experts} "
                         f"experts but transformers builds {len(experts)} of {experts[0].num_experts}")
    return shape


def load_model(model_dir: str | Path, dtype: str, accelerator: str, experts: str | None = None) -> LoadedModel:
    """Load the checkpoint with its routed experts in the plan's format `experts` (None: dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(model_dir).expanduser()
    device = resolve_device(accelerator)
    config = check_model_dir(folder)
    source = expert_source(folder, config, dtype, experts)
    register()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers raises many kinds here; all mean "no usable tokenizer"
        raise ModelError(f"{folder}: cannot load the tokenizer ({_first_line(exc)})") from None
    try:
        with ReleaseMappedPages(folder):  # keeps the loading peak near one checkpoint, not two
            if source.in_checkpoint and is_quantized(source.fmt):
                def build(cfg):
                    return AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype],
                                                            experts_implementation=IMPLEMENTATION_NAME)
                model, _ = load_quantized(folder, config, DTYPES[dtype], source.fmt, source.group_size,
                                          build, find_experts)
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    folder, dtype=DTYPES[dtype], experts_implementation=IMPLEMENTATION_NAME, use_safetensors=True)
    except (ValueError, KeyError) as exc:
        if "experts_implementation" in str(exc) or IMPLEMENTATION_NAME in str(exc):
            raise ModelError(f"{folder}: model type {config['model_type']!r} does not use transformers' "
                             f"experts interface, so moeplan cannot run it") from None
        raise ModelError(f"{folder}: cannot load the checkpoint ({_first_line(exc)})") from None
    except (OSError, RuntimeError, EnvironmentError) as exc:
        raise ModelError(f"{folder}: cannot load the checkpoint ({_first_line(exc)})") from None
    except Exception as exc:  # safetensors raises its own error type for corrupt files
        if type(exc).__name__ == "SafetensorError":
            raise ModelError(f"{folder}: corrupt safetensors file ({_first_line(exc)})") from None
        raise
    model.eval()
    model.requires_grad_(False)

    found, routers = find_experts(model)
    if not found:
        raise ModelError(f"{folder}: model type {config['model_type']!r} has no experts module that uses "
                         f"transformers' experts interface, so moeplan cannot run it")
    if is_quantized(source.fmt) and not source.in_checkpoint:
        quantize_at_load(found, source.fmt, source.group_size, str(folder),
                         report=lambda line: print(line, file=sys.stderr, flush=True))
    # a quantized checkpoint's dense tensors are private copies already (read, not mapped)
    _place(model, found, device, mapped=not (source.in_checkpoint and is_quantized(source.fmt)))
    log.info("loaded %s: %d MoE layers, %d experts each (%s), dense weights on %s", folder.name, len(found),
             found[0].num_experts, source.fmt, device)
    return LoadedModel(model, tokenizer, found, routers, device, folder, source.fmt, source.group_size)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def find_experts(model: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Module | None]]:
    """The experts modules in model order, and the router beside each (the MoE block's `gate`/`router`)."""
    experts, routers = [], []
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not is_experts_module(module):
            continue
        experts.append(module)
        parent = modules.get(name.rpartition(".")[0])
        router = None
        for attr in ("gate", "router"):
            candidate = getattr(parent, attr, None)
            if isinstance(candidate, torch.nn.Module) and getattr(candidate, "weight", None) is not None:
                router = candidate
                break
        routers.append(router)
    return experts, routers


def _place(model: torch.nn.Module, experts: list[torch.nn.Module], device: torch.device,
           mapped: bool = True) -> None:
    """Dense parameters and buffers to the accelerator; expert weights stay in (pinned) host memory.
    `mapped`: the dense tensors may be views of the memory-mapped checkpoint (transformers' loading)."""
    expert_params = {id(p) for m in experts for p in m.parameters(recurse=False)}
    if device.type == "cpu" and not mapped:
        pass
    elif device.type == "cpu":
        # Dense tensors that transformers did not convert are views of the memory-mapped safetensors
        # files, and they keep every page of those files mapped, the expert pages read during the
        # conversion to fused tensors included: a private copy of the (small) dense part lets the
        # mapping go, which gives back about the checkpoint's size in resident memory.
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and id(param) not in expert_params:
                    param.data = param.data.clone()
    else:
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is not None and id(param) not in expert_params:
                    param.data = param.data.to(device)
            for name, buf in list(module._buffers.items()):
                if buf is not None:
                    module._buffers[name] = buf.to(device)
    if device.type == "cuda":
        # Page-locking happens in place later (the engine, through the device seam): the experts must be
        # private memory for that, not views of the memory-mapped checkpoint files.
        for m in experts:
            for param in m.parameters(recurse=False):
                if _is_file_mapped(param.data):
                    param.data = param.data.clone()
            q = quantized_of(m)
            if q is not None:
                for p in q.projections:
                    for table in (q.qweight, q.scales):
                        if _is_file_mapped(table[p]):
                            table[p] = table[p].clone()


def _is_file_mapped(t: torch.Tensor) -> bool:
    """Whether a tensor's storage is a view of a memory-mapped file (safetensors loading hands those out
    for tensors it did not convert): its address falls in a file-backed mapping of /proc/self/maps."""
    ptr = t.untyped_storage().data_ptr()
    try:
        with open("/proc/self/maps", encoding="ascii") as f:
            for line in f:
                fields = line.split()
                start, end = (int(v, 16) for v in fields[0].split("-"))
                if start <= ptr < end:
                    return len(fields) >= 6 and fields[5].startswith("/")
    except OSError:
        return False
    return False
