"""The plan contract: round-trip, and every bad field named in the error."""
from __future__ import annotations

import pytest
import yaml

from runtime.errors import PlanError
from runtime.plan import Plan

GOOD = """
version: 1
model: {name: mixtral-8x7b, path: ~/models/Mixtral, dtype: bfloat16}
hardware: {accelerator: "cuda:0", cpu_threads: 8, profile: rtx4070}
cache: {slots: [2, 3, 0], policy: lfu, preload: [[1, 2], [3], []]}
miss: {compute: cpu, transfer_min_tokens: 32, promote: true}
prefetch: {lookahead: 1}
predicted: {decode_tokens_per_s: 4.2}
provenance: {seed: 0}
"""


def test_round_trip():
    plan = Plan.from_yaml(GOOD)
    assert Plan.from_yaml(plan.to_yaml()) == plan
    assert plan.cache.slots == (2, 3, 0) and plan.cache.preload == ((1, 2), (3,), ())
    assert plan.hardware.cpu_threads == 8 and plan.miss.promote is True


def test_defaults_round_trip():
    plan = Plan.from_yaml("version: 1")
    assert Plan.from_yaml(plan.to_yaml()) == plan
    assert plan.cache.slots == 0 and plan.cache.preload is None


def test_version_1_reads_as_version_2():
    v1 = Plan.from_yaml(GOOD)
    assert v1.version == 2 and v1.model.experts is None and v1.model.expert_format == "bfloat16"
    written = yaml.safe_load(v1.to_yaml())
    assert written["version"] == 2 and "experts" not in written["model"]
    assert Plan.from_yaml(GOOD.replace("version: 1", "version: 2")) == v1


@pytest.mark.parametrize("experts", ["int4", "int8", "bfloat16", "float16", "float32"])
def test_experts_round_trip(experts):
    plan = Plan.from_yaml(GOOD.replace("version: 1", "version: 2").replace("dtype: bfloat16",
                                                                            f"dtype: bfloat16, experts: {experts}"))
    assert plan.model.experts == experts and plan.model.expert_format == experts
    assert yaml.safe_load(plan.to_yaml())["model"]["experts"] == experts
    assert Plan.from_yaml(plan.to_yaml()) == plan


def test_version_1_cannot_name_experts():
    with pytest.raises(PlanError, match="model.experts: needs schema version 2"):
        Plan.from_yaml("version: 1\nmodel: {experts: int4}")


def mutate(path: str, value):
    data = yaml.safe_load(GOOD.replace("version: 1", "version: 2"))
    node = data
    keys = path.split(".")
    for k in keys[:-1]:
        node = node[k]
    if value is KeyError:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return data


@pytest.mark.parametrize("path,value,expected", [
    ("version", 3, "version: this moeplan reads schema versions 1 and 2, got 3"),
    ("version", KeyError, "version: missing"),
    ("version", "1", "version: must be an integer"),
    ("model.dtype", "int8", "model.dtype: must be one of"),
    ("model.experts", "int3", "model.experts: must be one of bfloat16, float16, float32, int8, int4, got 'int3'"),
    ("model.experts", 4, "model.experts: must be a string"),
    ("model.path", 3, "model.path: must be a string"),
    ("model.colour", "red", "model.colour: unknown key"),
    ("hardware.accelerator", "tpu", "hardware.accelerator: must be cpu or cuda:N"),
    ("hardware.cpu_threads", 0, "hardware.cpu_threads: must be >= 1, got 0"),
    ("hardware.cpu_threads", 2.5, "hardware.cpu_threads: must be an integer"),
    ("hardware.cpu_threads", True, "hardware.cpu_threads: must be an integer"),
    ("cache.slots", -1, "cache.slots: must be >= 0, got -1"),
    ("cache.slots", [2, -1, 0], "cache.slots[1]: must be >= 0, got -1"),
    ("cache.slots", [], "cache.slots: the list is empty"),
    ("cache.slots", "many", "cache.slots: must be an integer or a list"),
    ("cache.policy", "random", "cache.policy: must be one of lru, lfu, fifo, adaptive, markov, static"),
    ("cache.preload", [[1, 2], [3]], "cache.preload: has 2 lists but cache.slots has 3"),
    ("cache.preload", [[1, 2, 4], [3], []], "cache.preload[0]: 3 experts but the layer has 2 slots"),
    ("cache.preload", [[1, 1], [3], []], "cache.preload[0]: lists an expert twice"),
    ("cache.preload", [[1, -2], [3], []], "cache.preload[0][1]: must be >= 0"),
    ("cache.preload", "popular", "cache.preload: must be none or one list"),
    ("miss.compute", "gpu", "miss.compute: must be one of cpu, accelerator"),
    ("miss.transfer_min_tokens", -5, "miss.transfer_min_tokens: must be >= 0, got -5"),
    ("miss.promote", "yes", "miss.promote: must be true or false"),
    ("prefetch.lookahead", 2, "prefetch.lookahead: must be <= 1, got 2"),
    ("prefetch.depth", 1, "prefetch.depth: unknown key"),
    ("predicted", [1], "predicted: must be a mapping"),
])
def test_bad_field_is_named(path, value, expected):
    with pytest.raises(PlanError) as err:
        Plan.from_dict(mutate(path, value), source="p.yaml")
    assert expected in str(err.value)
    assert str(err.value).startswith("p.yaml: ")


def test_static_needs_preload():
    with pytest.raises(PlanError, match="cache.policy: static needs a preload list"):
        Plan.from_yaml("version: 1\ncache: {slots: 2, policy: static}")


def test_unknown_top_level_key():
    with pytest.raises(PlanError, match="colour: unknown key"):
        Plan.from_yaml("version: 1\ncolour: red")


@pytest.mark.parametrize("text,expected", [
    ("", "plan: the file is empty"),
    ("[1, 2]", "plan: must be a mapping"),
    ("version: [", "not valid YAML"),
    ("!!python/object/apply:os.system ['true']", "not valid YAML"),
])
def test_bad_documents(text, expected):
    with pytest.raises(PlanError, match=expected.replace("[", r"\[")):
        Plan.from_yaml(text)


def test_model_checks():
    plan = Plan.from_yaml("version: 1\ncache: {slots: [1, 2]}")
    with pytest.raises(PlanError, match="cache.slots: has 2 entries but the model has 3 MoE layers"):
        plan.cache.slots_per_layer(3, 8)
    with pytest.raises(PlanError, match=r"cache.slots: 9 slots but the model has only 8"):
        Plan.from_yaml("version: 1\ncache: {slots: 9}").cache.slots_per_layer(3, 8)
    with pytest.raises(PlanError, match=r"cache.preload\[0\]\[0\]: expert 8 does not exist"):
        Plan.from_yaml("version: 1\ncache: {slots: 1, preload: [[8]]}").cache.preload_per_layer(1, 8)


def test_load_errors(tmp_path):
    with pytest.raises(PlanError, match="no such plan file"):
        Plan.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bin.yaml"
    bad.write_bytes(b"version: 1\n\xff\xfe")
    with pytest.raises(PlanError, match="not UTF-8"):
        Plan.load(bad)
