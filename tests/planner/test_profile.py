"""The profile contract: round-trip, strict validation naming the field, and the readers' arithmetic."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.profile import Profile, ProfileError, expert_bytes, expert_flops

ROOT = Path(__file__).resolve().parents[2]


def sample() -> dict:
    return {
        "version": 1, "name": "sample", "source": "measured", "date": "2026-11-28T12:00:00Z",
        "host": {"cpu_model": "Test CPU", "physical_cores": 4, "logical_cores": 8, "isa": ["avx2"],
                 "memory_bytes": 32 << 30, "available_memory_bytes": 30 << 30, "os": "Linux", "torch": "2.13.0"},
        "cpu": {
            "memory_read_gbps": {1: 10.0, 2: 18.0, 4: 30.0},
            "expert_gbps": {"bfloat16": {1: 8.0, 4: 24.0}, "float32": {1: 9.0, 4: 27.0}},
            "expert_gflops": {"bfloat16": {1: 100.0, 4: 400.0}, "float32": {1: 50.0, 4: 200.0}},
            "expert_overhead_s": 2e-5, "layer_overhead_s": 1e-4,
            "expert_ffn": [
                {"hidden": 64, "intermediate": 128, "dtype": "bfloat16", "threads": 1, "tokens": 1,
                 "median_s": 0.001, "spread": 0.05},
                {"hidden": 64, "intermediate": 128, "dtype": "bfloat16", "threads": 1, "tokens": 8,
                 "median_s": 0.002, "spread": 0.05},
                {"hidden": 64, "intermediate": 128, "dtype": "bfloat16", "threads": 4, "tokens": 1,
                 "median_s": 0.0005, "spread": 0.1},
                {"hidden": 64, "intermediate": 128, "dtype": "bfloat16", "threads": 4, "tokens": 8,
                 "median_s": 0.0009, "spread": 0.1},
            ],
            "dense_layer": [{"hidden": 64, "heads": 4, "kv_heads": 2, "dtype": "bfloat16", "threads": 4,
                             "tokens": 1, "context": 512, "median_s": 3e-4, "spread": 0.2}],
        },
        "accelerator": {
            "name": "Test GPU", "memory_bytes": 12 << 30, "driver": "550.1", "pcie_gen": 4, "pcie_width": 16,
            "h2d_pinned_gbps": 25.0, "h2d_pageable_gbps": 12.0, "d2h_pinned_gbps": 26.0,
            "transfers": [{"direction": "h2d", "pinned": True, "bytes": 1 << 20, "median_s": 1e-4, "spread": 0.1},
                          {"direction": "h2d", "pinned": True, "bytes": 1 << 30, "median_s": 0.045, "spread": 0.01}],
            "memory_bandwidth_gbps": 500.0, "matmul_tflops": {"bfloat16": 30.0, "float16": 30.0},
            "kernel_overhead_s": 1e-5, "layer_overhead_s": 1e-4,
            "expert_ffn": [{"hidden": 64, "intermediate": 128, "dtype": "bfloat16", "tokens": 1, "median_s": 2e-5,
                            "spread": 0.1},
                           {"hidden": 64, "intermediate": 128, "dtype": "bfloat16", "tokens": 64, "median_s": 4e-5,
                            "spread": 0.1}],
        },
    }


def with_runtime_paths() -> dict:
    """`sample()` with the optional figures of the runtime's own paths: the last-level cache, the host copy
    rate, warm and cold dense rows, MoE-layer rows of each path and decode-step rows."""
    d = sample()
    d["host"]["llc_bytes"] = 32 << 20
    cpu = d["cpu"]
    cpu["memory_copy_gbps"] = {1: 8.0, 4: 16.0}
    cpu["dense_layer"] = [{**cpu["dense_layer"][0], "cache": "cold"},
                          {**cpu["dense_layer"][0], "cache": "warm", "median_s": 1e-4}]
    row = {"hidden": 64, "intermediate": 128, "dtype": "bfloat16", "spread": 0.1}
    cpu["moe_layer"] = [
        {**row, "threads": 1, "path": "token", "experts": 2, "tokens": 1, "cache": "cold", "median_s": 4e-4},
        {**row, "threads": 4, "path": "token", "experts": 2, "tokens": 1, "cache": "cold", "median_s": 2e-4},
        {**row, "threads": 1, "path": "token", "experts": 2, "tokens": 1, "cache": "warm", "median_s": 1e-4},
        {**row, "threads": 1, "path": "torch", "experts": 1, "tokens": 1, "cache": "cold", "median_s": 5e-4},
        {**row, "threads": 1, "path": "run", "experts": 1, "tokens": 1, "cache": "cold", "median_s": 3e-4},
        {**row, "threads": 1, "path": "run", "experts": 2, "tokens": 1, "cache": "cold", "median_s": 5e-4},
        {**row, "threads": 1, "path": "run", "experts": 1, "tokens": 8, "cache": "cold", "median_s": 1e-3},
        {**row, "threads": 1, "path": "run", "experts": 2, "tokens": 8, "cache": "cold", "median_s": 1.6e-3},
    ]
    cpu["model_step"] = [
        {"hidden": 64, "vocab": 1000, "dtype": "bfloat16", "threads": 1, "cache": "cold", "median_s": 6e-4,
         "spread": 0.1},
        {"hidden": 64, "vocab": 1000, "dtype": "bfloat16", "threads": 4, "cache": "cold", "median_s": 3e-4,
         "spread": 0.1},
    ]
    cpu["decode_layer"] = [
        {"hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "head_dim": 32, "dtype": "bfloat16",
         "threads": 1, "experts": 2, "context": 40, "cache": "cold", "median_s": 9e-4, "spread": 0.1},
    ]
    cpu["policy_step"] = [
        {"policy": "lru", "experts": 8, "top_k": 2, "slots": 2, "median_s": 9e-6, "spread": 0.05},
        {"policy": "markov", "experts": 8, "top_k": 2, "slots": 2, "median_s": 5e-5, "spread": 0.05},
    ]
    return d


def test_round_trip_yaml_dict_and_file(tmp_path):
    p = Profile.from_dict(sample())
    assert Profile.from_yaml(p.to_yaml()) == p
    assert Profile.from_dict(p.to_dict()) == p
    path = p.save(tmp_path / "sub" / "x.yaml")
    assert Profile.load(path) == p
    assert hash(Profile.load(path)) == hash(p)
    # No temporary file is left beside the profile (the write is atomic: temp name, then rename).
    assert [f.name for f in path.parent.iterdir()] == ["x.yaml"]


def test_the_runtime_path_figures_round_trip(tmp_path):
    p = Profile.from_dict(with_runtime_paths())
    assert Profile.from_yaml(p.to_yaml()) == p
    assert Profile.load(p.save(tmp_path / "x.yaml")) == p
    assert p.llc_bytes == 32 << 20 and p.cpu.memory_copy_gbps == {1: 8.0, 4: 16.0}
    assert [r.cache for r in p.cpu.dense_layer] == ["cold", "warm"]
    assert {r.path for r in p.cpu.moe_layer} == {"token", "run", "torch"} and len(p.cpu.model_step) == 2
    assert [(r.experts, r.context, r.head_dim, r.median_s) for r in p.cpu.decode_layer] == [(2, 40, 32, 9e-4)]
    text = p.to_yaml()
    assert "llc_bytes: 33554432" in text and "path: token" in text and "vocab: 1000" in text
    # A profile without them (the published ones, older measured ones) reads as before and says None.
    old = Profile.from_dict(sample())
    assert old.llc_bytes is None and old.cpu.moe_layer == () and old.cpu.model_step == () == old.cpu.decode_layer
    assert old.cpu.dense_layer[0].cache is None and "cache" not in old.to_yaml()
    assert old.cpu_moe_seconds(64, 128, "bfloat16", "token", 2, 1, 1, "cold") is None
    assert old.cpu_step_seconds(64, 1000, "bfloat16", 1, "cold") is None
    assert old.host_copy_seconds(1 << 20, 1) is None


def test_unquoted_timestamp_is_kept_as_text():
    text = Profile.from_dict(sample()).to_yaml().replace("'2026-11-28T12:00:00Z'", "2026-11-28T12:00:00Z")
    assert Profile.from_yaml(text).date == "2026-11-28T12:00:00Z"


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.integers(1, 256), st.floats(1e-3, 1e4, allow_nan=False), min_size=1, max_size=8),
       st.integers(1, 300))
def test_curves_round_trip_and_interpolate_within_bounds(curve, threads):
    d = sample()
    d["cpu"]["memory_read_gbps"] = curve
    p = Profile.from_dict(d)
    assert Profile.from_yaml(p.to_yaml()) == p
    rate = p.memory_read_gbps(threads)
    assert min(curve.values()) <= rate <= max(curve.values())
    if threads in curve:
        assert rate == pytest.approx(curve[threads])


def _set(d: dict, path: tuple, value) -> dict:
    d = copy.deepcopy(d)
    node = d
    for key in path[:-1]:
        node = node[key]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


_DELETE = object()
BAD = [
    (("cpu", "memory_read_gbps", 2), -3, "cpu.memory_read_gbps.2: must be a positive number, got -3"),
    (("cpu", "memory_read_gbps", 2), "fast", "cpu.memory_read_gbps.2: must be a positive number, got a string"),
    (("cpu", "memory_read_gbps"), {0: 1.0}, "cpu.memory_read_gbps.0: the key must be a thread count"),
    (("cpu", "memory_read_gbps"), {}, "cpu.memory_read_gbps: is empty"),
    (("cpu", "memory_read_gbps"), _DELETE, "cpu.memory_read_gbps: missing"),
    (("host", "physical_cores"), "two", "host.physical_cores: must be an integer, got a string"),
    (("host", "physical_cores"), 0, "host.physical_cores: must be a positive integer, got 0"),
    (("host", "memory_bytes"), _DELETE, "host.memory_bytes: missing"),
    (("host", "isa"), "avx2", "host.isa: must be a list of strings"),
    (("host", "ram"), 1, "host.ram: unknown key"),
    (("cpu",), _DELETE, "cpu: missing"),
    (("accelerator",), _DELETE, "accelerator: missing"),
    (("version",), 2, "version: this moeplan reads profile schema version 1, got 2"),
    (("source",), "guessed", "source: must be one of measured, published, got 'guessed'"),
    (("gpu",), {}, "gpu: unknown section"),
    (("cpu", "expert_overhead_s"), -1e-5, "cpu.expert_overhead_s: must be a number >= 0"),
    (("cpu", "expert_gbps", "int3"), {1: 3.0}, "cpu.expert_gbps.int3: unknown key"),
    (("cpu", "expert_gflops", "bfloat16", 4), True,
     "cpu.expert_gflops.bfloat16.4: must be a positive number, got a boolean"),
    (("cpu", "expert_ffn", 1, "median_s"), 0, "cpu.expert_ffn[1].median_s: must be a positive number, got 0"),
    (("cpu", "expert_ffn", 0, "threads"), _DELETE, "cpu.expert_ffn[0].threads: missing"),
    (("cpu", "expert_ffn", 0, "dtype"), "int3", "cpu.expert_ffn[0].dtype: must be one of"),
    (("cpu", "expert_ffn", 2, "speed"), 1, "cpu.expert_ffn[2].speed: unknown key"),
    (("cpu", "expert_ffn"), {"a": 1}, "cpu.expert_ffn: must be a list of rows"),
    (("cpu", "dense_layer", 0, "tokens"), 1024, "cpu.dense_layer[0].tokens: 1024 new tokens cannot exceed"),
    (("accelerator", "h2d_pinned_gbps"), _DELETE, "accelerator.h2d_pinned_gbps: missing"),
    (("accelerator", "matmul_tflops", "bfloat16"), float("nan"),
     "accelerator.matmul_tflops.bfloat16: must be a positive"),
    (("accelerator", "transfers", 0, "direction"), "sideways", "accelerator.transfers[0].direction: must be one of"),
    (("accelerator", "transfers", 1, "pinned"), "yes", "accelerator.transfers[1].pinned: must be true or false"),
    (("accelerator",), [], "accelerator: must be a mapping, got a list"),
    # the figures of the runtime's own paths (optional; a profile without them reads as before)
    (("host", "llc_bytes"), 0, "host.llc_bytes: must be a positive integer, got 0"),
    (("host", "llc_bytes"), "32M", "host.llc_bytes: must be an integer, got a string"),
    (("cpu", "memory_copy_gbps", 2), -1, "cpu.memory_copy_gbps.2: must be a positive number, got -1"),
    (("cpu", "memory_copy_gbps"), [8.0], "cpu.memory_copy_gbps: must be a mapping of thread count to number"),
    (("cpu", "dense_layer", 0, "cache"), "hot", "cpu.dense_layer[0].cache: must be one of warm, cold, got 'hot'"),
    (("cpu", "moe_layer", 0, "path"), "fused", "cpu.moe_layer[0].path: must be one of token, run, torch, got 'fused'"),
    (("cpu", "moe_layer", 0, "cache"), _DELETE, "cpu.moe_layer[0].cache: missing (required)"),
    (("cpu", "moe_layer", 1, "experts"), 0, "cpu.moe_layer[1].experts: must be a positive integer, got 0"),
    (("cpu", "moe_layer", 0, "tokens"), 8, "cpu.moe_layer[0].tokens: the token path runs one token, got 8"),
    (("cpu", "moe_layer", 3, "experts"), 2, "cpu.moe_layer[3].experts: the torch path runs one expert per call, got 2"),
    (("cpu", "moe_layer", 2, "median_s"), -1.0, "cpu.moe_layer[2].median_s: must be a positive number, got -1.0"),
    (("cpu", "moe_layer", 0, "speed"), 1, "cpu.moe_layer[0].speed: unknown key"),
    (("cpu", "moe_layer"), {"a": 1}, "cpu.moe_layer: must be a list of rows"),
    (("cpu", "model_step", 0, "vocab"), _DELETE, "cpu.model_step[0].vocab: missing (required)"),
    (("cpu", "decode_layer", 0, "experts"), _DELETE, "cpu.decode_layer[0].experts: missing (required)"),
    (("cpu", "decode_layer", 0, "kv_heads"), 3, "cpu.decode_layer[0].kv_heads: 3 does not divide heads 4"),
    (("cpu", "decode_layer", 0, "cache"), "hot", "cpu.decode_layer[0].cache"),
    (("cpu", "model_step", 1, "threads"), 1.5, "cpu.model_step[1].threads: must be an integer, got a number 1.5"),
    (("cpu", "model_step", 0, "cache"), None, "cpu.model_step[0].cache: missing (required)"),
    (("cpu", "policy_step", 0, "policy"), "mru", "cpu.policy_step[0].policy: must be one of lru, lfu, fifo, adaptive,"),
    (("cpu", "policy_step", 1, "top_k"), 9, "cpu.policy_step[1].top_k: 9 exceeds experts 8"),
    (("cpu", "policy_step", 0, "slots"), 0, "cpu.policy_step[0].slots: must be a positive integer, got 0"),
    (("cpu", "policy_step", 1, "median_s"), _DELETE, "cpu.policy_step[1].median_s: missing (required)"),
]


@pytest.mark.parametrize("path,value,message", BAD,
                         ids=[f"{i}-{m.split(':')[0]}" for i, (_, _, m) in enumerate(BAD)])
def test_bad_profiles_name_the_field(tmp_path, path, value, message):
    f = tmp_path / "x.yaml"
    f.write_text(yaml.safe_dump(_set(with_runtime_paths(), path, value)))
    with pytest.raises(ProfileError) as err:
        Profile.load(f)
    assert str(err.value).startswith(f"{f}: {message}"), str(err.value)


def test_unreadable_files_are_user_errors(tmp_path):
    with pytest.raises(ProfileError, match="no such profile file"):
        Profile.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("cpu: [unclosed\n")
    with pytest.raises(ProfileError, match="bad.yaml: not valid YAML at line"):
        Profile.load(tmp_path / "bad.yaml")
    with pytest.raises(ProfileError, match="profile: must be a mapping"):
        Profile.from_yaml("- 1\n")


# ---- readers -----------------------------------------------------------------------------------
def test_memory_read_gbps_interpolates_and_clamps():
    p = Profile.from_dict(sample())
    assert p.memory_read_gbps(1) == 10.0
    assert p.memory_read_gbps(3) == pytest.approx(24.0)
    assert p.memory_read_gbps(64) == 30.0
    with pytest.raises(ValueError, match="threads"):
        p.memory_read_gbps(0)


def test_cpu_expert_seconds_from_the_table():
    p = Profile.from_dict(sample())
    assert p.cpu_expert_seconds(64, 128, "bfloat16", 1, 1) == pytest.approx(0.001)
    assert p.cpu_expert_seconds(64, 128, "bfloat16", 8, 4) == pytest.approx(0.0009)
    # Threads 2 lies a third of the way from 1 to 4; tokens 4 lies 3/7 of the way from 1 to 8.
    assert p.cpu_expert_seconds(64, 128, "bfloat16", 1, 2) == pytest.approx(0.001 - 0.0005 / 3)
    assert p.cpu_expert_seconds(64, 128, "bfloat16", 4, 1) == pytest.approx(0.001 + 0.001 * 3 / 7)
    assert p.cpu_expert_seconds(64, 128, "bfloat16", 4, 4) == pytest.approx(0.0005 + 0.0004 * 3 / 7)
    # Beyond the largest token count the last segment's slope (1 ms per 7 tokens) continues: 7 more tokens.
    assert p.cpu_expert_seconds(64, 128, "bfloat16", 15, 1) == pytest.approx(0.002 + 0.001)
    assert p.cpu_expert_seconds(64, 128, "bfloat16", 0, 1) == 0.0


def test_cpu_moe_seconds_interpolates_over_experts_tokens_and_threads():
    p = Profile.from_dict(with_runtime_paths())

    def moe(path, experts, tokens=1, threads=1, cache="cold"):
        return p.cpu_moe_seconds(64, 128, "bfloat16", path, experts, tokens, threads, cache)

    assert moe("token", 2) == pytest.approx(4e-4) and moe("token", 2, cache="warm") == pytest.approx(1e-4)
    assert moe("token", 2, threads=4) == pytest.approx(2e-4) and moe("token", 2, threads=2) == pytest.approx(
        4e-4 - 2e-4 / 3)
    # Fewer experts than measured: in proportion towards no call at all; 0 experts or tokens: nothing.
    assert moe("token", 1) == pytest.approx(2e-4) and moe("token", 0.5) == pytest.approx(1e-4)
    assert moe("token", 0) == 0.0 and moe("run", 2, tokens=0) == 0.0
    # Between counts linear; beyond the largest the last segment's slope (2e-4 per expert) continues.
    assert moe("run", 1.5) == pytest.approx(4e-4) and moe("run", 8) == pytest.approx(5e-4 + 6 * 2e-4)
    # Tokens as in cpu_expert_seconds: between measured counts, and the last slope beyond.
    assert moe("run", 2, tokens=4) == pytest.approx(5e-4 + 1.1e-3 * 3 / 7)
    assert moe("run", 1, tokens=15) == pytest.approx(1e-3 + 7e-4)
    # One token count alone says nothing beyond it; a path, cache state or shape not timed: None.
    assert moe("torch", 1, tokens=8) is None and moe("torch", 1) == pytest.approx(5e-4)
    assert moe("run", 2, cache="warm") is None
    assert p.cpu_moe_seconds(64, 256, "bfloat16", "token", 2, 1, 1, "cold") is None
    with pytest.raises(ValueError, match="path must be one of"):
        moe("fused", 2)


def test_decode_step_and_host_copy_readers():
    p = Profile.from_dict(with_runtime_paths())
    assert p.cpu_step_seconds(64, 1000, "bfloat16", 1, "cold") == pytest.approx(6e-4)
    assert p.cpu_step_seconds(64, 1000, "bfloat16", 2, "cold") == pytest.approx(5e-4)
    assert p.cpu_step_seconds(64, 1000, "bfloat16", 1, "warm") is None
    assert p.cpu_step_seconds(64, 999, "bfloat16", 1, "cold") is None
    assert p.host_copy_seconds(16_000_000, 1) == pytest.approx(16e6 / 8e9)
    assert p.host_copy_seconds(16_000_000, 4) == pytest.approx(16e6 / 16e9)


def test_cpu_expert_seconds_from_fitted_rates_for_unmeasured_shapes():
    p = Profile.from_dict(sample())
    h, i = 4096, 14336
    one = 2e-5 + max(expert_bytes(h, i, "bfloat16") / 8e9, expert_flops(h, i, 1) / 100e9)
    assert p.cpu_expert_seconds(h, i, "bfloat16", 1, 1) == pytest.approx(one)
    many = 2e-5 + max(expert_bytes(h, i, "float32") / 27e9, expert_flops(h, i, 512) / 200e9)
    assert p.cpu_expert_seconds(h, i, "float32", 512, 4) == pytest.approx(many)
    assert expert_bytes(h, i, "bfloat16") == 352_321_536  # Mixtral-8x7B expert: 3 x 4096 x 14336 x 2 bytes
    missing = r"cpu\.expert_gbps\.float16: missing \(the profile has: bfloat16, float32\)"
    with pytest.raises(ProfileError, match=missing):
        p.cpu_expert_seconds(h, i, "float16", 1, 1)
    # an integer expert format is a row dtype too (its rows where measured, else its own rate table)
    with pytest.raises(ProfileError, match=r"cpu\.expert_gbps\.int8: missing"):
        p.cpu_expert_seconds(h, i, "int8", 1, 1)
    with pytest.raises(ValueError, match="dtype"):
        p.cpu_expert_seconds(h, i, "int3", 1, 1)


def test_accelerator_readers():
    p = Profile.from_dict(sample())
    assert p.has_accelerator and p.accelerator_memory_bytes == 12 << 30
    assert p.accelerator_expert_seconds(64, 128, "bfloat16", 1) == pytest.approx(2e-5)
    h, i = 4096, 14336
    assert p.accelerator_expert_seconds(h, i, "bfloat16", 1) == pytest.approx(
        1e-5 + expert_bytes(h, i, "bfloat16") / 500e9)
    with pytest.raises(ProfileError, match=r"accelerator\.matmul_tflops\.float32: missing"):
        p.accelerator_expert_seconds(h, i, "float32", 1)
    # Copies: the table between measured sizes, the large-transfer rate beyond, pageable from its rate.
    assert p.h2d_seconds(1 << 30) == pytest.approx(0.045)
    assert p.h2d_seconds(2 << 30) == pytest.approx(0.045 + (1 << 30) / 25e9)
    assert 1e-4 < p.h2d_seconds(64 << 20) < 0.045
    assert p.h2d_seconds(352_321_536, pinned=False) == pytest.approx(352_321_536 / 12e9)
    with pytest.raises(ProfileError, match=r"accelerator\.d2h_pageable_gbps: missing"):
        p.d2h_seconds(1 << 20, pinned=False)


def test_profile_without_accelerator():
    d = sample()
    d["accelerator"] = None
    p = Profile.from_dict(d)
    assert not p.has_accelerator and p.accelerator_memory_bytes == 0
    assert p.physical_cores == 4 and p.host_memory_bytes == 32 << 30
    with pytest.raises(ProfileError, match="accelerator: is null"):
        p.h2d_seconds(1 << 20)


# ---- the profiles shipped in profiles/ --------------------------------------------------------
SHIPPED = sorted((ROOT / "profiles").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_profiles_load_and_answer_the_cost_model(path):
    p = Profile.load(path)
    assert Profile.from_yaml(p.to_yaml()) == p
    dtypes = ("bfloat16", "float16") if p.source == "published" else ("bfloat16", "float32")
    for threads in range(1, p.physical_cores + 1):
        assert p.memory_read_gbps(threads) > 0
        for dtype in dtypes:
            for tokens in (1, 16, 512):
                t = p.cpu_expert_seconds(4096, 14336, dtype, tokens, threads)
                assert 0 < t < 60
    if p.source == "published":
        assert p.has_accelerator and p.cpu.layer_overhead_s is not None
        for dtype in dtypes:
            assert p.accelerator_expert_seconds(4096, 14336, dtype, 1) > 0
        assert p.h2d_seconds(352_321_536) > p.h2d_seconds(1 << 20) > 0
        assert p.h2d_seconds(352_321_536, pinned=False) > p.h2d_seconds(352_321_536)
