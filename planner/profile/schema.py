"""Strict reading and canonical writing of profile files (schema version 1; docs/profile.md).

Every error names the field path: mapping keys joined by dots (`cpu.memory_read_gbps.2`), list items
in brackets (`cpu.expert_ffn[3].median_s`). Unknown keys are errors at every level, so a typo never
silently drops a measurement.
"""
from __future__ import annotations

import datetime as _dt
from typing import Any

import yaml

from runtime.contracts.cache_policy import POLICIES
from runtime.contracts.fields import FieldChecker, join
from .records import (CACHE_STATES, DTYPE_BYTES, EXPERT_FORMATS, MOE_PATHS, SCHEMA_VERSION, SOURCES, AcceleratorProfile, CpuProfile,
                      DenseRow, ExpertRow, HostInfo, LoopLayerRow, MoeRow, PolicyRow, ProfileError, StepRow, TransferRow)

_TOP = ("version", "name", "source", "date", "host", "cpu", "accelerator")
_HOST = ("cpu_model", "physical_cores", "logical_cores", "isa", "memory_bytes", "available_memory_bytes",
         "llc_bytes", "os", "torch")
_CPU = ("memory_read_gbps", "memory_copy_gbps", "expert_gbps", "expert_gflops", "expert_overhead_s",
        "layer_overhead_s", "expert_ffn", "dense_layer", "moe_layer", "model_step", "decode_layer", "policy_step")
_ACC = ("name", "memory_bytes", "free_memory_bytes", "driver", "pcie_gen", "pcie_width", "h2d_pinned_gbps",
        "h2d_pageable_gbps", "d2h_pinned_gbps", "d2h_pageable_gbps", "transfers", "memory_bandwidth_gbps",
        "matmul_tflops", "kernel_overhead_s", "layer_overhead_s", "expert_ffn", "dense_layer", "host_sync_s",
        "h2d_registered_gbps")
_EXPERT_ROW = ("hidden", "intermediate", "dtype", "threads", "tokens", "median_s", "spread")
_DENSE_ROW = ("hidden", "heads", "kv_heads", "head_dim", "dtype", "threads", "tokens", "context", "cache",
              "median_s", "spread")
_MOE_ROW = ("hidden", "intermediate", "dtype", "threads", "path", "experts", "tokens", "cache", "median_s", "spread")
_STEP_ROW = ("hidden", "vocab", "dtype", "threads", "cache", "median_s", "spread")
_LOOP_ROW = ("hidden", "intermediate", "heads", "kv_heads", "head_dim", "dtype", "threads", "experts", "context",
             "cache", "median_s", "spread")
_TRANSFER_ROW = ("direction", "pinned", "bytes", "median_s", "spread")
_POLICY_ROW = ("policy", "experts", "top_k", "slots", "median_s", "spread")


# ---- reading -----------------------------------------------------------------------------------
def parse_profile(data: Any) -> dict[str, Any]:
    """The fields of a `Profile` read from `data`, checked (`Profile.from_dict` builds it)."""
    top = _mapping(data, "", _TOP)
    for key in ("version", "name", "source", "host", "cpu", "accelerator"):
        if key not in top:
            raise ProfileError(f"{key}: missing (required; write `accelerator: null` for a host without GPU)"
                               if key == "accelerator" else f"{key}: missing (required)")
    version = _int(top["version"], "version")
    if version != SCHEMA_VERSION:
        raise ProfileError(f"version: this moeplan reads profile schema version {SCHEMA_VERSION}, got {version}")
    name = _str(top["name"], "name")
    if not name.strip():
        raise ProfileError("name: must not be empty")
    source = _str(top["source"], "source", SOURCES)
    date = _date(top.get("date"), "date")
    host = _host(_mapping(top["host"], "host", _HOST, required=True))
    cpu = _cpu(_mapping(top["cpu"], "cpu", _CPU, required=True))
    accelerator = None if top["accelerator"] is None else _accelerator(
        _mapping(top["accelerator"], "accelerator", _ACC, required=True))
    return dict(name=name, source=source, host=host, cpu=cpu, accelerator=accelerator, date=date, version=version)


def _host(h: dict[str, Any]) -> HostInfo:
    _require(h, "host", ("physical_cores", "memory_bytes"))
    isa = h.get("isa")
    if isa is None:
        isa_t: tuple[str, ...] = ()
    elif isinstance(isa, list):
        isa_t = tuple(_str(x, f"host.isa[{i}]") for i, x in enumerate(isa))
    else:
        raise ProfileError(f"host.isa: must be a list of strings, got {_kind(isa)}")
    logical = _opt(h, "logical_cores", "host", _positive_int)
    physical = _positive_int(h["physical_cores"], "host.physical_cores")
    return HostInfo(physical_cores=physical, memory_bytes=_positive_int(h["memory_bytes"], "host.memory_bytes"),
                    cpu_model=_opt(h, "cpu_model", "host", _str), logical_cores=logical, isa=isa_t,
                    available_memory_bytes=_opt(h, "available_memory_bytes", "host", _nonneg_int),
                    llc_bytes=_opt(h, "llc_bytes", "host", _positive_int), os=_opt(h, "os", "host", _str),
                    torch=_opt(h, "torch", "host", _str))


def _cpu(c: dict[str, Any]) -> CpuProfile:
    _require(c, "cpu", ("memory_read_gbps",))
    return CpuProfile(
        memory_read_gbps=_thread_curve(c["memory_read_gbps"], "cpu.memory_read_gbps"),
        expert_gbps=_opt(c, "expert_gbps", "cpu", _dtype_curves),
        expert_gflops=_opt(c, "expert_gflops", "cpu", _dtype_curves),
        expert_overhead_s=_opt(c, "expert_overhead_s", "cpu", _nonneg_number),
        layer_overhead_s=_opt(c, "layer_overhead_s", "cpu", _nonneg_number),
        expert_ffn=_rows(c.get("expert_ffn"), "cpu.expert_ffn", _EXPERT_ROW, lambda r, p: _expert_row(r, p, cpu=True)),
        dense_layer=_rows(c.get("dense_layer"), "cpu.dense_layer", _DENSE_ROW, lambda r, p: _dense_row(r, p, cpu=True)),
        memory_copy_gbps=_opt(c, "memory_copy_gbps", "cpu", _thread_curve),
        moe_layer=_rows(c.get("moe_layer"), "cpu.moe_layer", _MOE_ROW, _moe_row),
        model_step=_rows(c.get("model_step"), "cpu.model_step", _STEP_ROW, _step_row),
        decode_layer=_rows(c.get("decode_layer"), "cpu.decode_layer", _LOOP_ROW, _loop_row),
        policy_step=_rows(c.get("policy_step"), "cpu.policy_step", _POLICY_ROW, _policy_row),
    )


def _accelerator(a: dict[str, Any]) -> AcceleratorProfile:
    p = "accelerator"
    _require(a, p, ("name", "memory_bytes", "h2d_pinned_gbps"))
    tflops = a.get("matmul_tflops")
    if tflops is not None:
        tflops = _mapping(tflops, f"{p}.matmul_tflops", DTYPE_BYTES, required=True)
        tflops = {dt: _positive_number(v, f"{p}.matmul_tflops.{dt}") for dt, v in tflops.items()}
    return AcceleratorProfile(
        name=_str(a["name"], f"{p}.name"),
        memory_bytes=_positive_int(a["memory_bytes"], f"{p}.memory_bytes"),
        h2d_pinned_gbps=_positive_number(a["h2d_pinned_gbps"], f"{p}.h2d_pinned_gbps"),
        free_memory_bytes=_opt(a, "free_memory_bytes", p, _nonneg_int),
        driver=_opt(a, "driver", p, _str),
        pcie_gen=_opt(a, "pcie_gen", p, _positive_int),
        pcie_width=_opt(a, "pcie_width", p, _positive_int),
        h2d_pageable_gbps=_opt(a, "h2d_pageable_gbps", p, _positive_number),
        d2h_pinned_gbps=_opt(a, "d2h_pinned_gbps", p, _positive_number),
        d2h_pageable_gbps=_opt(a, "d2h_pageable_gbps", p, _positive_number),
        transfers=_rows(a.get("transfers"), f"{p}.transfers", _TRANSFER_ROW, _transfer_row),
        memory_bandwidth_gbps=_opt(a, "memory_bandwidth_gbps", p, _positive_number),
        matmul_tflops=tflops,
        kernel_overhead_s=_opt(a, "kernel_overhead_s", p, _nonneg_number),
        layer_overhead_s=_opt(a, "layer_overhead_s", p, _nonneg_number),
        expert_ffn=_rows(a.get("expert_ffn"), f"{p}.expert_ffn", _EXPERT_ROW,
                         lambda r, q: _expert_row(r, q, cpu=False)),
        dense_layer=_rows(a.get("dense_layer"), f"{p}.dense_layer", _DENSE_ROW,
                          lambda r, q: _dense_row(r, q, cpu=False)),
        host_sync_s=_opt(a, "host_sync_s", p, _positive_number),
        h2d_registered_gbps=_opt(a, "h2d_registered_gbps", p, _positive_number),
    )


def _expert_row(r: dict[str, Any], p: str, cpu: bool) -> ExpertRow:
    _require(r, p, ("hidden", "intermediate", "dtype", "tokens", "median_s", "spread") + (("threads",) if cpu else ()))
    return ExpertRow(hidden=_positive_int(r["hidden"], f"{p}.hidden"),
                     intermediate=_positive_int(r["intermediate"], f"{p}.intermediate"),
                     dtype=_str(r["dtype"], f"{p}.dtype", EXPERT_FORMATS),
                     tokens=_positive_int(r["tokens"], f"{p}.tokens"),
                     median_s=_positive_number(r["median_s"], f"{p}.median_s"),
                     spread=_nonneg_number(r["spread"], f"{p}.spread"),
                     threads=_opt(r, "threads", p, _positive_int))


def _dense_row(r: dict[str, Any], p: str, cpu: bool) -> DenseRow:
    _require(r, p, ("hidden", "heads", "kv_heads", "dtype", "tokens", "context", "median_s", "spread")
             + (("threads",) if cpu else ()))
    row = DenseRow(hidden=_positive_int(r["hidden"], f"{p}.hidden"), heads=_positive_int(r["heads"], f"{p}.heads"),
                   kv_heads=_positive_int(r["kv_heads"], f"{p}.kv_heads"),
                   dtype=_str(r["dtype"], f"{p}.dtype", tuple(DTYPE_BYTES)),
                   tokens=_positive_int(r["tokens"], f"{p}.tokens"),
                   context=_positive_int(r["context"], f"{p}.context"),
                   median_s=_positive_number(r["median_s"], f"{p}.median_s"),
                   spread=_nonneg_number(r["spread"], f"{p}.spread"),
                   threads=_opt(r, "threads", p, _positive_int), head_dim=_opt(r, "head_dim", p, _positive_int),
                   cache=_opt(r, "cache", p, lambda v, q: _str(v, q, CACHE_STATES)))
    if row.tokens > row.context:
        raise ProfileError(f"{p}.tokens: {row.tokens} new tokens cannot exceed the context of {row.context}")
    if row.heads % row.kv_heads:
        raise ProfileError(f"{p}.kv_heads: {row.kv_heads} does not divide heads {row.heads}")
    return row


def _moe_row(r: dict[str, Any], p: str) -> MoeRow:
    _require(r, p, _MOE_ROW)
    row = MoeRow(hidden=_positive_int(r["hidden"], f"{p}.hidden"),
                 intermediate=_positive_int(r["intermediate"], f"{p}.intermediate"),
                 dtype=_str(r["dtype"], f"{p}.dtype", EXPERT_FORMATS),
                 threads=_positive_int(r["threads"], f"{p}.threads"),
                 path=_str(r["path"], f"{p}.path", MOE_PATHS),
                 experts=_positive_int(r["experts"], f"{p}.experts"),
                 tokens=_positive_int(r["tokens"], f"{p}.tokens"),
                 cache=_str(r["cache"], f"{p}.cache", CACHE_STATES),
                 median_s=_positive_number(r["median_s"], f"{p}.median_s"),
                 spread=_nonneg_number(r["spread"], f"{p}.spread"))
    if row.path == "token" and row.tokens != 1:
        raise ProfileError(f"{p}.tokens: the token path runs one token, got {row.tokens}")
    if row.path == "torch" and row.experts != 1:
        raise ProfileError(f"{p}.experts: the torch path runs one expert per call, got {row.experts}")
    return row


def _step_row(r: dict[str, Any], p: str) -> StepRow:
    _require(r, p, _STEP_ROW)
    return StepRow(hidden=_positive_int(r["hidden"], f"{p}.hidden"), vocab=_positive_int(r["vocab"], f"{p}.vocab"),
                   dtype=_str(r["dtype"], f"{p}.dtype", tuple(DTYPE_BYTES)),
                   threads=_positive_int(r["threads"], f"{p}.threads"),
                   cache=_str(r["cache"], f"{p}.cache", CACHE_STATES),
                   median_s=_positive_number(r["median_s"], f"{p}.median_s"),
                   spread=_nonneg_number(r["spread"], f"{p}.spread"))


def _loop_row(r: dict[str, Any], p: str) -> LoopLayerRow:
    _require(r, p, tuple(k for k in _LOOP_ROW if k != "head_dim"))
    row = LoopLayerRow(hidden=_positive_int(r["hidden"], f"{p}.hidden"),
                       intermediate=_positive_int(r["intermediate"], f"{p}.intermediate"),
                       heads=_positive_int(r["heads"], f"{p}.heads"), kv_heads=_positive_int(r["kv_heads"], f"{p}.kv_heads"),
                       dtype=_str(r["dtype"], f"{p}.dtype", tuple(DTYPE_BYTES)),
                       threads=_positive_int(r["threads"], f"{p}.threads"),
                       experts=_positive_int(r["experts"], f"{p}.experts"),
                       context=_positive_int(r["context"], f"{p}.context"),
                       cache=_str(r["cache"], f"{p}.cache", CACHE_STATES),
                       median_s=_positive_number(r["median_s"], f"{p}.median_s"),
                       spread=_nonneg_number(r["spread"], f"{p}.spread"),
                       head_dim=_opt(r, "head_dim", p, _positive_int))
    if row.heads % row.kv_heads:
        raise ProfileError(f"{p}.kv_heads: {row.kv_heads} does not divide heads {row.heads}")
    return row


def _policy_row(r: dict[str, Any], p: str) -> PolicyRow:
    _require(r, p, _POLICY_ROW)
    row = PolicyRow(policy=_str(r["policy"], f"{p}.policy", POLICIES),
                    experts=_positive_int(r["experts"], f"{p}.experts"),
                    top_k=_positive_int(r["top_k"], f"{p}.top_k"),
                    slots=_positive_int(r["slots"], f"{p}.slots"),
                    median_s=_positive_number(r["median_s"], f"{p}.median_s"),
                    spread=_nonneg_number(r["spread"], f"{p}.spread"))
    if row.top_k > row.experts:
        raise ProfileError(f"{p}.top_k: {row.top_k} exceeds experts {row.experts}")
    if row.slots > row.experts:
        raise ProfileError(f"{p}.slots: {row.slots} exceeds experts {row.experts}")
    return row


def _transfer_row(r: dict[str, Any], p: str) -> TransferRow:
    _require(r, p, _TRANSFER_ROW)
    return TransferRow(direction=_str(r["direction"], f"{p}.direction", ("h2d", "d2h")),
                       pinned=_bool(r["pinned"], f"{p}.pinned"), bytes=_positive_int(r["bytes"], f"{p}.bytes"),
                       median_s=_positive_number(r["median_s"], f"{p}.median_s"),
                       spread=_nonneg_number(r["spread"], f"{p}.spread"))


# ---- the shared checkers, raising ProfileError with the field path ------------------------------
_check = FieldChecker(ProfileError, "profile", top_unknown="unknown section")
_kind, _mapping, _require, _int = _check.kind, _check.mapping, _check.require, _check.integer
_positive_int, _number, _str, _bool = _check.positive_integer, _check.number, _check.string, _check.boolean
_positive_number, _nonneg_number = _check.positive_number, _check.non_negative_number


def _opt(m: dict[str, Any], key: str, path: str, check: Any) -> Any:
    value = m.get(key)
    return None if value is None else check(value, join(path, key))


def _nonneg_int(value: Any, path: str) -> int:
    return _check.integer(value, path, lo=0)


def _date(value: Any, path: str) -> str | None:
    # YAML reads an unquoted ISO timestamp as a datetime; keep the text form either way.
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        text = value.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(value, _dt.date):
        return value.isoformat()
    return _str(value, path)


def _thread_curve(value: Any, path: str) -> dict[int, float]:
    if not isinstance(value, dict):
        raise ProfileError(f"{path}: must be a mapping of thread count to number, got {_kind(value)}")
    if not value:
        raise ProfileError(f"{path}: is empty (needs at least one thread count)")
    out: dict[int, float] = {}
    for key, v in value.items():
        if isinstance(key, bool) or not isinstance(key, int) or key < 1:
            raise ProfileError(f"{join(path, key)}: the key must be a thread count >= 1, got {key!r}")
        out[key] = _positive_number(v, join(path, key))
    return dict(sorted(out.items()))


def _dtype_curves(value: Any, path: str) -> dict[str, dict[int, float]]:
    m = _mapping(value, path, EXPERT_FORMATS, required=True)
    return {dt: _thread_curve(curve, join(path, dt)) for dt, curve in m.items()}


def _rows(value: Any, path: str, allowed: tuple[str, ...], parse_row: Any) -> tuple:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ProfileError(f"{path}: must be a list of rows, got {_kind(value)}")
    return tuple(parse_row(_mapping(row, f"{path}[{i}]", allowed, required=True), f"{path}[{i}]")
                 for i, row in enumerate(value))


# ---- writing -----------------------------------------------------------------------------------
def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None and v != () and v != []}


def _row_dict(row: Any, order: tuple[str, ...]) -> dict[str, Any]:
    return _drop_none({k: getattr(row, k) for k in order})


def profile_to_dict(p: Any) -> dict[str, Any]:
    """A `Profile` as the plain mapping its file holds, in canonical order."""
    h = p.host
    host = _drop_none({"cpu_model": h.cpu_model, "physical_cores": h.physical_cores, "logical_cores": h.logical_cores,
                       "isa": list(h.isa), "memory_bytes": h.memory_bytes,
                       "available_memory_bytes": h.available_memory_bytes, "llc_bytes": h.llc_bytes, "os": h.os,
                       "torch": h.torch})
    c = p.cpu
    cpu = _drop_none({
        "memory_read_gbps": dict(c.memory_read_gbps),
        "memory_copy_gbps": None if c.memory_copy_gbps is None else dict(c.memory_copy_gbps),
        "expert_gbps": None if c.expert_gbps is None else {k: dict(v) for k, v in c.expert_gbps.items()},
        "expert_gflops": None if c.expert_gflops is None else {k: dict(v) for k, v in c.expert_gflops.items()},
        "expert_overhead_s": c.expert_overhead_s, "layer_overhead_s": c.layer_overhead_s,
        "expert_ffn": [_row_dict(r, _EXPERT_ROW) for r in c.expert_ffn],
        "dense_layer": [_row_dict(r, _DENSE_ROW) for r in c.dense_layer],
        "moe_layer": [_row_dict(r, _MOE_ROW) for r in c.moe_layer],
        "model_step": [_row_dict(r, _STEP_ROW) for r in c.model_step],
        "decode_layer": [_row_dict(r, _LOOP_ROW) for r in c.decode_layer],
        "policy_step": [_row_dict(r, _POLICY_ROW) for r in c.policy_step],
    })
    out: dict[str, Any] = _drop_none({"version": p.version, "name": p.name, "source": p.source, "date": p.date,
                                      "host": host, "cpu": cpu})
    a = p.accelerator
    out["accelerator"] = None if a is None else _drop_none({
        "name": a.name, "memory_bytes": a.memory_bytes, "free_memory_bytes": a.free_memory_bytes, "driver": a.driver,
        "pcie_gen": a.pcie_gen, "pcie_width": a.pcie_width, "h2d_pinned_gbps": a.h2d_pinned_gbps,
        "h2d_pageable_gbps": a.h2d_pageable_gbps, "d2h_pinned_gbps": a.d2h_pinned_gbps,
        "d2h_pageable_gbps": a.d2h_pageable_gbps, "transfers": [_row_dict(r, _TRANSFER_ROW) for r in a.transfers],
        "memory_bandwidth_gbps": a.memory_bandwidth_gbps,
        "matmul_tflops": None if a.matmul_tflops is None else dict(a.matmul_tflops),
        "kernel_overhead_s": a.kernel_overhead_s, "layer_overhead_s": a.layer_overhead_s,
        "expert_ffn": [_row_dict(r, _EXPERT_ROW) for r in a.expert_ffn],
        "dense_layer": [_row_dict(r, _DENSE_ROW) for r in a.dense_layer],
        "host_sync_s": a.host_sync_s, "h2d_registered_gbps": a.h2d_registered_gbps,
    })
    return out


class _ProfileDumper(yaml.SafeDumper):
    """Safe dumper that writes small all-scalar mappings and lists on one line (table rows, thread curves)."""


def _scalar(x: Any) -> bool:
    return x is None or isinstance(x, (bool, int, float, str))


def _represent_dict(dumper: yaml.SafeDumper, data: dict) -> yaml.Node:
    # One line each for thread curves ({1: 14.1, 2: 26.8}), table rows and per-dtype figures;
    # block style for the sections.
    scalars = bool(data) and all(_scalar(v) for v in data.values())
    flow = scalars and (all(isinstance(k, int) for k in data) or "median_s" in data
                        or all(k in EXPERT_FORMATS for k in data))
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=all(_scalar(x) for x in data))


_ProfileDumper.add_representer(dict, _represent_dict)
_ProfileDumper.add_representer(list, _represent_list)


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_ProfileDumper, sort_keys=False, default_flow_style=False, width=120)
