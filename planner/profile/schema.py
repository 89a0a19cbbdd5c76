"""Strict reading and canonical writing of profile files (schema version 1; docs/profile.md).

Every error names the field path: mapping keys joined by dots (`cpu.memory_read_gbps.2`), list items
in brackets (`cpu.expert_ffn[3].median_s`). Unknown keys are errors at every level, so a typo never
silently drops a measurement.
"""
from __future__ import annotations

import datetime as _dt
from typing import Any

import yaml

from .records import (DTYPE_BYTES, SCHEMA_VERSION, SOURCES, AcceleratorProfile, CpuProfile, DenseRow, ExpertRow,
                      HostInfo, ProfileError, TransferRow)

_TOP = ("version", "name", "source", "date", "host", "cpu", "accelerator")
_HOST = ("cpu_model", "physical_cores", "logical_cores", "isa", "memory_bytes", "available_memory_bytes", "os",
         "torch")
_CPU = ("memory_read_gbps", "expert_gbps", "expert_gflops", "expert_overhead_s", "layer_overhead_s", "expert_ffn",
        "dense_layer")
_ACC = ("name", "memory_bytes", "free_memory_bytes", "driver", "pcie_gen", "pcie_width", "h2d_pinned_gbps",
        "h2d_pageable_gbps", "d2h_pinned_gbps", "d2h_pageable_gbps", "transfers", "memory_bandwidth_gbps",
        "matmul_tflops", "kernel_overhead_s", "layer_overhead_s", "expert_ffn", "dense_layer")
_EXPERT_ROW = ("hidden", "intermediate", "dtype", "threads", "tokens", "median_s", "spread")
_DENSE_ROW = ("hidden", "heads", "kv_heads", "head_dim", "dtype", "threads", "tokens", "context", "median_s",
              "spread")
_TRANSFER_ROW = ("direction", "pinned", "bytes", "median_s", "spread")


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
                    os=_opt(h, "os", "host", _str), torch=_opt(h, "torch", "host", _str))


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
    )


def _expert_row(r: dict[str, Any], p: str, cpu: bool) -> ExpertRow:
    _require(r, p, ("hidden", "intermediate", "dtype", "tokens", "median_s", "spread") + (("threads",) if cpu else ()))
    return ExpertRow(hidden=_positive_int(r["hidden"], f"{p}.hidden"),
                     intermediate=_positive_int(r["intermediate"], f"{p}.intermediate"),
                     dtype=_str(r["dtype"], f"{p}.dtype", tuple(DTYPE_BYTES)),
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
                   threads=_opt(r, "threads", p, _positive_int), head_dim=_opt(r, "head_dim", p, _positive_int))
    if row.tokens > row.context:
        raise ProfileError(f"{p}.tokens: {row.tokens} new tokens cannot exceed the context of {row.context}")
    if row.heads % row.kv_heads:
        raise ProfileError(f"{p}.kv_heads: {row.kv_heads} does not divide heads {row.heads}")
    return row


def _transfer_row(r: dict[str, Any], p: str) -> TransferRow:
    _require(r, p, _TRANSFER_ROW)
    return TransferRow(direction=_str(r["direction"], f"{p}.direction", ("h2d", "d2h")),
                       pinned=_bool(r["pinned"], f"{p}.pinned"), bytes=_positive_int(r["bytes"], f"{p}.bytes"),
                       median_s=_positive_number(r["median_s"], f"{p}.median_s"),
                       spread=_nonneg_number(r["spread"], f"{p}.spread"))


# ---- small checkers that name the field path ---------------------------------------------------
def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _mapping(value: Any, path: str, allowed: tuple[str, ...] | dict[str, Any], required: bool = False
             ) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise ProfileError(f"{path or 'profile'}: must be a mapping, got {_kind(value)}")
    for key in value:
        if not isinstance(key, str) or key not in allowed:
            what = "unknown section" if not path else "unknown key"
            raise ProfileError(f"{_join(path, key)}: {what} (allowed: {', '.join(allowed)})")
    return value


def _require(m: dict[str, Any], path: str, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key not in m or m[key] is None:
            raise ProfileError(f"{_join(path, key)}: missing (required)")


def _opt(m: dict[str, Any], key: str, path: str, check: Any) -> Any:
    value = m.get(key)
    return None if value is None else check(value, _join(path, key))


def _int(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProfileError(f"{path}: must be an integer, got {_kind(value)} {value!r}")
    return value


def _positive_int(value: Any, path: str) -> int:
    if _int(value, path) < 1:
        raise ProfileError(f"{path}: must be a positive integer, got {value}")
    return value


def _nonneg_int(value: Any, path: str) -> int:
    if _int(value, path) < 0:
        raise ProfileError(f"{path}: must be >= 0, got {value}")
    return value


def _number(value: Any, path: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (
            float("inf"), float("-inf")):
        raise ProfileError(f"{path}: must be {what}, got {_kind(value)} {value!r}")
    return float(value)


def _positive_number(value: Any, path: str) -> float:
    x = _number(value, path, "a positive number")
    if x <= 0:
        raise ProfileError(f"{path}: must be a positive number, got {value}")
    return x


def _nonneg_number(value: Any, path: str) -> float:
    x = _number(value, path, "a number >= 0")
    if x < 0:
        raise ProfileError(f"{path}: must be a number >= 0, got {value}")
    return x


def _str(value: Any, path: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(value, str):
        raise ProfileError(f"{path}: must be a string, got {_kind(value)} {value!r}")
    if choices is not None and value not in choices:
        raise ProfileError(f"{path}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ProfileError(f"{path}: must be true or false, got {_kind(value)} {value!r}")
    return value


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
            raise ProfileError(f"{_join(path, key)}: the key must be a thread count >= 1, got {key!r}")
        out[key] = _positive_number(v, _join(path, key))
    return dict(sorted(out.items()))


def _dtype_curves(value: Any, path: str) -> dict[str, dict[int, float]]:
    m = _mapping(value, path, tuple(DTYPE_BYTES), required=True)
    return {dt: _thread_curve(curve, _join(path, dt)) for dt, curve in m.items()}


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
                       "available_memory_bytes": h.available_memory_bytes, "os": h.os, "torch": h.torch})
    c = p.cpu
    cpu = _drop_none({
        "memory_read_gbps": dict(c.memory_read_gbps),
        "expert_gbps": None if c.expert_gbps is None else {k: dict(v) for k, v in c.expert_gbps.items()},
        "expert_gflops": None if c.expert_gflops is None else {k: dict(v) for k, v in c.expert_gflops.items()},
        "expert_overhead_s": c.expert_overhead_s, "layer_overhead_s": c.layer_overhead_s,
        "expert_ffn": [_row_dict(r, _EXPERT_ROW) for r in c.expert_ffn],
        "dense_layer": [_row_dict(r, _DENSE_ROW) for r in c.dense_layer],
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
                        or all(k in DTYPE_BYTES for k in data))
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=all(_scalar(x) for x in data))


_ProfileDumper.add_representer(dict, _represent_dict)
_ProfileDumper.add_representer(list, _represent_list)


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.dump(data, Dumper=_ProfileDumper, sort_keys=False, default_flow_style=False, width=120)
