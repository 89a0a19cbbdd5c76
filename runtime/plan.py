"""The execution plan (schema version 2, docs/run.md): frozen dataclasses, strict loading, round-trip.

Version 2 adds `model.experts` (how the routed experts are stored: a float dtype, int8 or int4); a
version 1 plan reads as version 2 without it (its experts are stored in `model.dtype`), and plans are
written as version 2.

A plan says where experts live and what happens on a miss. It is data only: the runtime reads it, the
planner writes it. Every error names the field path (`cache.slots[3]: must be >= 0, got -1`).
Standard library and PyYAML only, so that `planner/` can import it without torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .contracts.cache_policy import MISS_COMPUTE, POLICIES, MissRule
from .contracts.expert_format import FORMATS
from .contracts.fields import FieldChecker
from .errors import PlanError
from .textfile import parse_yaml, read_text

SCHEMA_VERSION = 2
READS_VERSIONS = (1, 2)  # version 1: no model.experts (migrated on reading)
DTYPES = ("float32", "bfloat16", "float16")
_ACCELERATOR = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class ModelSpec:
    name: str = ""  # informational: the catalog name the plan was tuned for
    path: str | None = None  # local Hugging Face folder; `run --model DIR` overrides it
    dtype: str = "bfloat16"  # dense weights and activations: float32 | bfloat16 | float16
    # storage of the routed experts: bfloat16 | float16 | float32 | int8 | int4; None = dtype (then not
    # written, so that a plan without the key round-trips as it was)
    experts: str | None = None

    @property
    def expert_format(self) -> str:
        """The routed experts' storage format: `experts`, or the dtype where the plan names none."""
        return self.experts or self.dtype


@dataclass(frozen=True)
class HardwareSpec:
    accelerator: str = "cpu"  # cuda:N, or cpu (then the "cache" is host memory: used by tests)
    cpu_threads: int = 1  # threads for CPU expert work
    profile: str = ""  # informational: the profile the plan was tuned against


@dataclass(frozen=True)
class CacheSpec:
    # Experts kept on the accelerator per MoE layer: one int for every layer, or one int per layer.
    slots: int | tuple[int, ...] = 0
    policy: str = "lru"  # lru | lfu | fifo | adaptive | markov | static (the preloaded set never changes)
    # None, or one tuple of expert ids per MoE layer, loaded before the first token.
    preload: tuple[tuple[int, ...], ...] | None = None

    def slots_per_layer(self, num_layers: int, num_experts: int) -> list[int]:
        """The slot count of each MoE layer, checked against the model's layer and expert counts."""
        if isinstance(self.slots, int):
            per_layer = [self.slots] * num_layers
        else:
            if len(self.slots) != num_layers:
                raise PlanError(f"cache.slots: has {len(self.slots)} entries but the model has "
                                f"{num_layers} MoE layers")
            per_layer = list(self.slots)
        for i, n in enumerate(per_layer):
            if n > num_experts:
                where = "cache.slots" if isinstance(self.slots, int) else f"cache.slots[{i}]"
                raise PlanError(f"{where}: {n} slots but the model has only {num_experts} experts per layer")
        return per_layer

    def preload_per_layer(self, num_layers: int, num_experts: int) -> list[list[int]]:
        """The preload list of each MoE layer (empty lists when there is none), checked against the model."""
        if self.preload is None:
            return [[] for _ in range(num_layers)]
        if len(self.preload) != num_layers:
            raise PlanError(f"cache.preload: has {len(self.preload)} lists but the model has "
                            f"{num_layers} MoE layers")
        for i, ids in enumerate(self.preload):
            for j, e in enumerate(ids):
                if e >= num_experts:
                    raise PlanError(f"cache.preload[{i}][{j}]: expert {e} does not exist "
                                    f"(the model has {num_experts} experts per layer)")
        return [list(ids) for ids in self.preload]


@dataclass(frozen=True)
class MissSpec:
    compute: str = "cpu"  # cpu | accelerator: where a missed expert is computed
    # A missed expert used by at least this many tokens in one pass is copied and computed on the
    # accelerator (prefill); 0 = never.
    transfer_min_tokens: int = 0
    promote: bool = False  # after a CPU-computed miss, copy the expert into the cache in the background

    @property
    def rule(self) -> MissRule:
        """The rule the cache policy applies (runtime and simulator alike)."""
        return MissRule(self.compute, self.transfer_min_tokens, self.promote)


@dataclass(frozen=True)
class PrefetchSpec:
    lookahead: int = 0  # 0 = off; 1 = guess the next MoE layer's experts and start copies early


@dataclass(frozen=True)
class Plan:
    version: int = SCHEMA_VERSION
    model: ModelSpec = field(default_factory=ModelSpec)
    hardware: HardwareSpec = field(default_factory=HardwareSpec)
    cache: CacheSpec = field(default_factory=CacheSpec)
    miss: MissSpec = field(default_factory=MissSpec)
    prefetch: PrefetchSpec = field(default_factory=PrefetchSpec)
    predicted: dict[str, Any] | None = None  # written by `tune`, ignored by `run`
    provenance: dict[str, Any] | None = None  # written by `tune`, ignored by `run`

    # ---- loading and saving -------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, text: str, source: str = "plan") -> "Plan":
        return cls.from_dict(parse_yaml(text, source, PlanError), source)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_yaml(read_text(path, PlanError, "plan file"), source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> "Plan":
        try:
            return _parse_plan(data)
        except PlanError as exc:
            raise PlanError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        cache: dict[str, Any] = {
            "slots": self.cache.slots if isinstance(self.cache.slots, int) else list(self.cache.slots),
            "policy": self.cache.policy,
            "preload": "none" if self.cache.preload is None else [list(ids) for ids in self.cache.preload],
        }
        out: dict[str, Any] = {
            "version": self.version,
            "model": {"name": self.model.name, "path": self.model.path, "dtype": self.model.dtype,
                      **({"experts": self.model.experts} if self.model.experts is not None else {})},
            "hardware": {"accelerator": self.hardware.accelerator, "cpu_threads": self.hardware.cpu_threads,
                         "profile": self.hardware.profile},
            "cache": cache,
            "miss": {"compute": self.miss.compute, "transfer_min_tokens": self.miss.transfer_min_tokens,
                     "promote": self.miss.promote},
            "prefetch": {"lookahead": self.prefetch.lookahead},
        }
        if self.predicted is not None:
            out["predicted"] = self.predicted
        if self.provenance is not None:
            out["provenance"] = self.provenance
        return out

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_PlanDumper, sort_keys=False, default_flow_style=False)

    def with_model_path(self, path: str) -> "Plan":
        return replace(self, model=replace(self.model, path=path))


class _PlanDumper(yaml.SafeDumper):
    """Safe dumper that writes lists of numbers inline (`[0, 3, 5]`), the rest in block style."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_PlanDumper.add_representer(list, _represent_list)


# ---- validation: the shared checkers, raising PlanError with the field path ------------------------
_check = FieldChecker(PlanError, "plan")
_kind, _int, _str, _bool = _check.kind, _check.integer, _check.string, _check.boolean


def _mapping(value: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    return _check.mapping(value, path, allowed)


FREE_FORM_LIMIT = 100_000  # values in `predicted:` / `provenance:`; tune writes a few dozen


def _optional_mapping(value: Any, path: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PlanError(f"{path}: must be a mapping, got {_kind(value)}")
    # YAML aliases can make a few hundred bytes stand for billions of values ("billion laughs"): count
    # the values as a reader that expands them (json.dumps in `run --json`) would, and stop early.
    stack, seen = [value], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > FREE_FORM_LIMIT:
            raise PlanError(f"{path}: holds more than {FREE_FORM_LIMIT} values (YAML aliases expanded)")
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return value


def _parse_plan(data: Any) -> Plan:
    if data is None:
        raise PlanError(f"the file is empty (a plan is a mapping that starts with version: {SCHEMA_VERSION})")
    top = _mapping(data, "", ("version", "model", "hardware", "cache", "miss", "prefetch", "predicted",
                              "provenance"))
    readable = " and ".join(str(v) for v in READS_VERSIONS)
    if "version" not in top:
        raise PlanError(f"version: missing (this moeplan reads schema versions {readable})")
    version = _int(top["version"], "version")
    if version not in READS_VERSIONS:
        raise PlanError(f"version: this moeplan reads schema versions {readable}, got {version}")

    m = _mapping(top.get("model"), "model", ("name", "path", "dtype", "experts"))
    if version == 1 and "experts" in m:  # a version 1 plan that names it is a mistake, not a migration
        raise PlanError("model.experts: needs schema version 2 (the plan says version: 1)")
    d = ModelSpec()
    model = ModelSpec(
        name=_str(m.get("name", d.name) or "", "model.name"),
        path=None if m.get("path") is None else _str(m["path"], "model.path"),
        dtype=_str(m.get("dtype", d.dtype), "model.dtype", DTYPES),
        experts=None if m.get("experts") is None else _str(m["experts"], "model.experts", FORMATS),
    )

    h = _mapping(top.get("hardware"), "hardware", ("accelerator", "cpu_threads", "profile"))
    dh = HardwareSpec()
    accelerator = _str(h.get("accelerator", dh.accelerator), "hardware.accelerator")
    if not _ACCELERATOR.match(accelerator):
        raise PlanError(f"hardware.accelerator: must be cpu or cuda:N, got {accelerator!r}")
    hardware = HardwareSpec(
        accelerator=accelerator,
        cpu_threads=_int(h.get("cpu_threads", dh.cpu_threads), "hardware.cpu_threads", lo=1, hi=4096),
        profile=_str(h.get("profile", dh.profile) or "", "hardware.profile"),
    )

    cache = _parse_cache(_mapping(top.get("cache"), "cache", ("slots", "policy", "preload")))

    x = _mapping(top.get("miss"), "miss", ("compute", "transfer_min_tokens", "promote"))
    dx = MissSpec()
    miss = MissSpec(
        compute=_str(x.get("compute", dx.compute), "miss.compute", MISS_COMPUTE),
        transfer_min_tokens=_int(x.get("transfer_min_tokens", dx.transfer_min_tokens),
                                 "miss.transfer_min_tokens", lo=0),
        promote=_bool(x.get("promote", dx.promote), "miss.promote"),
    )

    p = _mapping(top.get("prefetch"), "prefetch", ("lookahead",))
    prefetch = PrefetchSpec(lookahead=_int(p.get("lookahead", 0), "prefetch.lookahead", lo=0, hi=1))

    return Plan(version=SCHEMA_VERSION, model=model, hardware=hardware, cache=cache, miss=miss, prefetch=prefetch,
                predicted=_optional_mapping(top.get("predicted"), "predicted"),
                provenance=_optional_mapping(top.get("provenance"), "provenance"))


def _parse_cache(c: dict[str, Any]) -> CacheSpec:
    raw_slots = c.get("slots", 0)
    slots: int | tuple[int, ...]
    if isinstance(raw_slots, list):
        if not raw_slots:
            raise PlanError("cache.slots: the list is empty (one int per MoE layer)")
        slots = tuple(_int(n, f"cache.slots[{i}]", lo=0) for i, n in enumerate(raw_slots))
    else:
        if not isinstance(raw_slots, int) or isinstance(raw_slots, bool):
            raise PlanError(f"cache.slots: must be an integer or a list of integers, got {_kind(raw_slots)}")
        slots = _int(raw_slots, "cache.slots", lo=0)
    policy = _str(c.get("policy", "lru"), "cache.policy", POLICIES)

    raw_preload = c.get("preload", "none")
    preload: tuple[tuple[int, ...], ...] | None
    if raw_preload is None or raw_preload == "none":
        preload = None
    elif isinstance(raw_preload, list):
        if isinstance(slots, tuple) and len(raw_preload) != len(slots):
            raise PlanError(f"cache.preload: has {len(raw_preload)} lists but cache.slots has {len(slots)} entries")
        layers = []
        for i, ids in enumerate(raw_preload):
            if not isinstance(ids, list):
                raise PlanError(f"cache.preload[{i}]: must be a list of expert ids, got {_kind(ids)}")
            parsed = tuple(_int(e, f"cache.preload[{i}][{j}]", lo=0) for j, e in enumerate(ids))
            if len(set(parsed)) != len(parsed):
                raise PlanError(f"cache.preload[{i}]: lists an expert twice")
            cap = slots if isinstance(slots, int) else slots[i]
            if len(parsed) > cap:
                raise PlanError(f"cache.preload[{i}]: {len(parsed)} experts but the layer has {cap} slots")
            layers.append(parsed)
        preload = tuple(layers)
    else:
        raise PlanError(f"cache.preload: must be none or one list of expert ids per MoE layer, "
                        f"got {_kind(raw_preload)} {raw_preload!r}")
    if policy == "static" and preload is None:
        raise PlanError("cache.policy: static needs a preload list (the set it keeps)")
    return CacheSpec(slots=slots, policy=policy, preload=preload)
