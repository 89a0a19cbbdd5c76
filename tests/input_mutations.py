"""Mutated plan, profile, trace and config.json documents for fuzzing the loaders (hypothesis strategies).

Shared by tests/test_fuzz_inputs.py (a few hundred examples) and bench/fuzz_inputs.py (as many as asked).
Each loader is wrapped by `outcome(name, data)`: "accepted", "rejected" (a UserError subclass), or
"crashed: ..." (any other exception, or a hang past the per-example deadline).
"""
from __future__ import annotations

import copy
import json
import math
import signal
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import strategies as st

from runtime.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
PROFILE_FILE = ROOT / "tests" / "planner" / "data" / "desktop-rtx4070-published.yaml"
DEADLINE_S = 10.0  # per example: longer counts as a hang (a crash); deep YAML nesting takes ~1-2 s to reject
LAYERS, EXPERTS = 3, 8  # the model layout plans are checked against

VALID_PLAN: dict[str, Any] = {
    "version": 1,
    "model": {"name": "m", "path": "/nowhere", "dtype": "bfloat16"},
    "hardware": {"accelerator": "cpu", "cpu_threads": 2, "profile": "p"},
    "cache": {"slots": [2, 2, 2], "policy": "lru", "preload": [[0, 1], [2], []]},
    "miss": {"compute": "cpu", "transfer_min_tokens": 32, "promote": True},
    "prefetch": {"lookahead": 0},
    "predicted": {"decode_tokens_per_s": 3.5},
}
VALID_TRACE: list[dict[str, Any]] = [
    {"trace": 1, "model": "m", "num_layers": 2, "num_experts": 4, "top_k": 2, "source": "recorded"},
    {"pass": 0, "phase": "prefill", "tokens": 2, "experts": [[[0, 1], [2, 3]], [[1, 0], [3, 2]]],
     "weights": [[[0.6, 0.4], [0.5, 0.5]], [[0.7, 0.3], [0.9, 0.1]]]},
    {"pass": 1, "phase": "decode", "tokens": 1, "experts": [[[0, 2]], [[1, 3]]]},
]
VALID_CONFIG: dict[str, Any] = {
    "model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320, "num_local_experts": 8,
    "num_experts_per_tok": 2, "torch_dtype": "float32",
}


def valid_profile() -> dict[str, Any]:
    return yaml.safe_load(PROFILE_FILE.read_text())


# ---- values and mutations -----------------------------------------------------------------------
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.sampled_from([0, -1, 1, 2**63, -2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 1e308]),
    st.text(max_size=20), st.sampled_from(["none", "lru", "cpu", "cuda:0", "static", "", "1", "prefill"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=10)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a document (dict keys and list indices), the root included."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _get(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


@st.composite
def mutated(draw: Any, valid: Any, rounds: int = 3) -> Any:
    """`valid` with 1..rounds mutations: replace a value, delete or add a key, grow or shrink a list, nest."""
    doc = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, rounds))):
        path = draw(st.sampled_from(_paths(doc)))
        kind = draw(st.sampled_from(["replace", "delete", "add", "resize", "nest"]))
        if kind == "replace" or not path and kind in ("delete", "replace"):
            if not path:
                doc = draw(VALUES)
                continue
            _get(doc, path[:-1])[path[-1]] = draw(VALUES)
        elif kind == "delete" and path:
            parent = _get(doc, path[:-1])
            del parent[path[-1]]
        else:
            node = _get(doc, path)
            if kind == "add" and isinstance(node, dict):
                node[draw(st.text(max_size=8) | st.sampled_from(["version", "slots", "extra"]))] = draw(VALUES)
            elif kind == "resize" and isinstance(node, list):
                if node and draw(st.booleans()):
                    node.pop()
                else:
                    node.append(copy.deepcopy(node[0]) if node else draw(VALUES))
            elif kind == "nest" and path:
                depth = draw(st.sampled_from([2, 50, 200]))
                value: Any = _get(doc, path)
                for _ in range(depth):
                    value = [value]
                _get(doc, path[:-1])[path[-1]] = value
    return doc


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """Billion-laughs YAML: `width ** levels` leaves through anchors and aliases, a few hundred bytes of text."""
    lines = ["a0: &a0 [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _text_attacks(valid_yaml: str) -> st.SearchStrategy[bytes]:
    bomb = alias_bomb()
    return st.sampled_from([
        b"", b"\n\n", b"\xff\xfe\x00\x81", valid_yaml.encode()[:len(valid_yaml) // 2],
        valid_yaml.encode() + b"\n\xc3\x28\n",
        bomb.encode(),
        (valid_yaml + "predicted:\n  " + bomb.replace("\n", "\n  ")).encode(),
        (valid_yaml + "provenance: !!python/object/apply:os.system ['echo pwned']\n").encode(),
        b"!!python/object:runtime.plan.Plan {}\n",
        b"version: &v 1\nmodel: *v\n",
        b"[" * 3000 + b"]" * 3000,
        b"{" * 3000 + b"}" * 3000,
        b"version: 1\nversion: 1\n",
        b"? [a, b]\n: 1\n",
        b"version: 1\t\n\x00\n",
    ])


def yaml_documents(valid: dict[str, Any]) -> st.SearchStrategy[bytes]:
    text = yaml.safe_dump(valid, sort_keys=False)
    return st.one_of(mutated(valid).map(lambda d: yaml.safe_dump(d, sort_keys=False).encode()),
                     _text_attacks(text))


def trace_documents() -> st.SearchStrategy[bytes]:
    def dump(lines: Any) -> bytes:
        if not isinstance(lines, list):
            lines = [lines]
        return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()

    valid = dump(VALID_TRACE)
    return st.one_of(
        mutated(VALID_TRACE).map(dump),
        st.sampled_from([b"", b"\n", b"\xff\xfe", valid[: len(valid) // 2], valid + b"\xc3\x28\n",
                         b"[" * 100_000 + b"]" * 100_000, valid.replace(b"2", b"2" * 5000, 1),
                         valid + b'{"pass": 2, "phase": "decode", "tokens": 1e999, "experts": []}\n',
                         b'{"trace": 1, "model": "!!python/object/apply:os.system", "num_layers": 1, '
                         b'"num_experts": 2, "top_k": 1, "source": "recorded"}\n'
                         b'{"pass": 0, "phase": "decode", "tokens": 1, "experts": [[[1]]]}\n',
                         b'{"tok": 0, "layers": [[0, 1], [1, 2]]}\n{"tok": 1, "layers": [[0]]}\n']))


def config_documents() -> st.SearchStrategy[bytes]:
    return st.one_of(mutated(VALID_CONFIG).map(lambda d: json.dumps(d).encode()),
                     st.sampled_from([b"", b"\xff", b"[1]", b"{" * 100_000, b"[" * 100_000 + b"]" * 100_000,
                                      b'{"model_type": "qwen2_moe", "mlp_only_layers": [[1]]}']))


# ---- the loaders under test -----------------------------------------------------------------------
class _Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Hang(f"no answer within {DEADLINE_S} s")


class Workspace:
    """A temporary folder with one file per loader, rewritten for each example."""

    def __init__(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="moeplan-fuzz-")
        self.root = Path(self._tmp.name)
        (self.root / "model").mkdir()

    def close(self) -> None:
        self._tmp.cleanup()

    def file(self, name: str, data: bytes) -> Path:
        p = self.root / name
        p.write_bytes(data)
        return p


def _load_plan(ws: Workspace, data: bytes) -> None:
    from runtime.plan import Plan

    plan = Plan.load(ws.file("plan.yaml", data))
    plan.cache.slots_per_layer(LAYERS, EXPERTS)
    plan.cache.preload_per_layer(LAYERS, EXPERTS)
    json.dumps(plan.to_dict(), default=str)  # what `run --json` does with `predicted`: must not explode


def _load_profile(ws: Workspace, data: bytes) -> None:
    from planner.profile import Profile

    Profile.load(ws.file("profile.yaml", data))


def _profile_from_dict(ws: Workspace, data: Any) -> None:
    from planner.profile import Profile

    Profile.from_dict(data)


def _load_trace(ws: Workspace, data: bytes) -> None:
    from runtime.contracts.traces import load_trace

    load_trace(ws.file("trace.jsonl", data))


def _load_config(ws: Workspace, data: bytes) -> None:
    from planner.catalog import load_model_shape

    (ws.root / "model" / "config.json").write_bytes(data)
    load_model_shape(str(ws.root / "model"))


LOADERS = {"plan": _load_plan, "profile": _load_profile, "profile_dict": _profile_from_dict,
           "trace": _load_trace, "config": _load_config}


def strategy(name: str) -> st.SearchStrategy[Any]:
    if name == "plan":
        return yaml_documents(VALID_PLAN)
    if name == "profile":
        return yaml_documents(valid_profile())
    if name == "profile_dict":
        return mutated(valid_profile())
    if name == "trace":
        return trace_documents()
    if name == "config":
        return config_documents()
    raise KeyError(name)


def outcome(ws: Workspace, name: str, data: Any) -> str:
    """accepted | rejected | crashed: <exception> (a hang past DEADLINE_S is a crash)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    try:
        LOADERS[name](ws, data)
        return "accepted"
    except UserError:
        return "rejected"
    except Exception as exc:  # noqa: BLE001 - what the fuzzer is looking for
        return f"crashed: {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
