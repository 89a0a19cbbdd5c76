from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trace_factory import OLMOE, make_trace

from runtime.contracts.traces import load_trace, write_trace
from runtime.errors import TraceError

HEADER = {"trace": 1, "model": "m", "num_layers": 2, "num_experts": 4, "top_k": 2, "source": "recorded"}
PASS = {"pass": 0, "phase": "prefill", "tokens": 2, "experts": [[[0, 1], [1, 2]], [[3, 2], [0, 3]]],
        "weights": [[[0.6, 0.4], [0.5, 0.5]], [[0.7, 0.3], [0.9, 0.1]]]}


def _write(tmp_path, lines, name="t.jsonl"):
    path = tmp_path / name
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_moeplan_format_reads_header_passes_and_helpers(tmp_path):
    decode = {"pass": 1, "phase": "decode", "tokens": 1, "experts": [[[2, 0]], [[1, 3]]]}
    trace = load_trace(_write(tmp_path, [dict(HEADER, prompt="hi"), PASS, decode]))
    assert trace.header.num_layers == 2 and trace.header.extra == {"prompt": "hi"}
    assert [p.index for p in trace.prefill_passes()] == [0] and [p.index for p in trace.decode_passes()] == [1]
    assert trace.passes[0].weights[1][0] == (0.7, 0.3) and trace.passes[1].weights is None
    assert trace.tokens_per_expert(trace.passes[0], 0) == {0: 1, 1: 2, 2: 1}
    assert trace.tokens_per_expert(1, 1) == {1: 1, 3: 1}


def test_write_then_load_round_trips(tmp_path):
    trace = load_trace(_write(tmp_path, [dict(HEADER, prompt="x"), PASS]))
    out = write_trace(tmp_path / "sub" / "copy.jsonl", trace)
    assert load_trace(out) == trace
    assert [p.name for p in out.parent.iterdir()] == ["copy.jsonl"]  # no temporary file left behind


def test_guesses_round_trip_and_give_the_guess_accuracy(tmp_path):
    from planner.routing.statistics import guess_accuracy

    # layer 1 needs {0, 2, 3} in pass 0 (guessed {0, 3}: two right) and {1, 3} in pass 1 (guessed {1, 3}: both)
    guessed = dict(PASS, guesses=[[], [3, 0]])
    decode = {"pass": 1, "phase": "decode", "tokens": 1, "experts": [[[2, 0]], [[1, 3]]], "guesses": [[], [1, 3]]}
    trace = load_trace(_write(tmp_path, [HEADER, guessed, decode]))
    assert trace.passes[0].guesses == ((), (0, 3))  # ascending, as the runtime records them
    assert load_trace(write_trace(tmp_path / "copy.jsonl", trace)) == trace
    assert guess_accuracy(trace) == 4 / 5 and guess_accuracy(trace, ("decode",)) == 1.0
    assert guess_accuracy(load_trace(_write(tmp_path, [HEADER, PASS], "plain.jsonl"))) is None


def test_compact_format_infers_header(tmp_path):
    rows = [{"tok": 1, "layers": [[0, 5], [2, 3]]}, {"tok": 2, "layers": [[1, 5], [3, 4]]}]
    trace = load_trace(_write(tmp_path, rows, "run.jsonl"))
    h = trace.header
    assert (h.model, h.num_layers, h.num_experts, h.top_k, h.source) == ("run", 2, 6, 2, "recorded")
    assert [p.phase for p in trace.passes] == ["decode", "decode"] and trace.passes[1].experts[1] == ((3, 4),)
    given = load_trace(_write(tmp_path, rows, "run.jsonl"), num_experts=64, model="olmoe")
    assert (given.header.num_experts, given.header.model) == (64, "olmoe")
    # written in the moeplan format, it reads back equal
    assert load_trace(write_trace(tmp_path / "w.jsonl", trace)) == trace


def test_olmoe_trace_loads():
    trace = load_trace(OLMOE)
    h = trace.header
    assert (h.num_layers, h.num_experts, h.top_k, len(trace.passes)) == (16, 64, 8, 299)


BAD_MOEPLAN = [
    ([b"\xff\xfe garbage"], "t.jsonl:1: not UTF-8"),
    (["{not json"], "t.jsonl:1: not valid JSON"),
    (["[1, 2]"], "t.jsonl:1: expected a JSON object"),
    ([{"foo": 1}], "neither a moeplan trace header"),
    ([{k: v for k, v in HEADER.items() if k != "top_k"}], "header is missing key 'top_k'"),
    ([dict(HEADER, trace=2)], "reads trace version 1, got 2"),
    ([dict(HEADER, num_experts=0)], "header num_experts: must be >= 1, got 0"),
    ([dict(HEADER, source="made-up")], "header source: must be one of"),
    ([dict(HEADER, top_k=5)], "top_k 5 exceeds num_experts 4"),
    ([HEADER, {k: v for k, v in PASS.items() if k != "experts"}], "t.jsonl:2: pass is missing key 'experts'"),
    ([HEADER, dict(PASS, phase="train")], "t.jsonl:2: phase: must be prefill or decode, got 'train'"),
    ([HEADER, dict(PASS, tokens=0)], "t.jsonl:2: tokens: must be >= 1, got 0"),
    ([HEADER, dict(PASS, experts=PASS["experts"][:1])], "experts: must be a list of 2 layers, got 1 entries"),
    ([HEADER, dict(PASS, tokens=3)], "experts[0]: must be a list of 3 tokens, got 2 entries"),
    ([HEADER, dict(PASS, experts=[[[0, 1], [1]], [[3, 2], [0, 3]]])], "experts[0][1]: must be a list of 2 expert ids"),
    ([HEADER, dict(PASS, experts=[[[0, 4], [1, 2]], [[3, 2], [0, 3]]])], "experts[0][0]: expert id 4 out of range 0..3"),
    ([HEADER, dict(PASS, experts=[[[0, "1"], [1, 2]], [[3, 2], [0, 3]]])], "expert id must be an integer"),
    ([HEADER, dict(PASS, experts=[[[1, 1], [1, 2]], [[3, 2], [0, 3]]])], "experts[0][0]: lists an expert twice"),
    ([HEADER, dict(PASS, weights=[[[0.5, 0.5]]])], "weights: must be a list of 2 layers"),
    ([HEADER, dict(PASS, weights=[[[0.6, "x"], [0.5, 0.5]], [[0.7, 0.3], [0.9, 0.1]]])],
     "weights[0][0]: must hold finite numbers"),
    ([HEADER, PASS, "", "oops"], "t.jsonl:4: not valid JSON"),
    ([HEADER, dict(PASS, guesses=[[]])], "guesses: must be a list of 2 layers, got 1 entries"),
    ([HEADER, dict(PASS, guesses=[[], 3])], "guesses[1]: must be a list of expert ids"),
    ([HEADER, dict(PASS, guesses=[[], [4]])], "guesses[1]: expert ids must be integers in 0..3, got 4"),
    ([HEADER, dict(PASS, guesses=[[], [1, 1]])], "guesses[1]: lists an expert twice"),
]


@pytest.mark.parametrize("lines, message", BAD_MOEPLAN, ids=[m for _, m in BAD_MOEPLAN])
def test_malformed_moeplan_trace_is_a_trace_error(tmp_path, lines, message):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"".join((x if isinstance(x, bytes) else (x if isinstance(x, str) else json.dumps(x)).encode())
                              + b"\n" for x in lines))
    with pytest.raises(TraceError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_trace(path)


BAD_SHARED = [
    ([{"tok": 1}], "t.jsonl:1: row is missing key 'layers'"),
    ([{"tok": 1, "layers": []}], "layers: must be a non-empty list"),
    ([{"tok": 1, "layers": [[0, 1]]}, {"tok": 2, "layers": [[0, 1], [1, 2]]}], "t.jsonl:2: layers: has 2 layers but line 1 has 1"),
    ([{"tok": 1, "layers": [[0, 1]]}, {"tok": 2, "layers": [[0]]}], "t.jsonl:2: layers[0]: must be a list of 2 expert ids, got 1 ids"),
    ([{"tok": 1, "layers": [[0, -1]]}], "expert id -1 out of range"),
    ([{"tok": "a", "layers": [[0, 1]]}], "tok: must be an integer"),
    ([{"tok": 1, "layers": [[0, 1]]}, [1]], "t.jsonl:2: expected a JSON object"),
]


@pytest.mark.parametrize("lines, message", BAD_SHARED, ids=[m for _, m in BAD_SHARED])
def test_malformed_compact_trace_is_a_trace_error(tmp_path, lines, message):
    with pytest.raises(TraceError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        load_trace(_write(tmp_path, lines))


def test_compact_format_checks_given_expert_count(tmp_path):
    with pytest.raises(TraceError, match=r"expert id 9 out of range 0\.\.7"):
        load_trace(_write(tmp_path, [{"tok": 1, "layers": [[0, 9]]}]), num_experts=8)
    with pytest.raises(TraceError, match="header num_experts is 4 but 8 was given"):
        load_trace(_write(tmp_path, [HEADER, PASS], "m.jsonl"), num_experts=8)


def test_missing_empty_and_folder_files(tmp_path):
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(TraceError, match="empty.jsonl: empty trace file"):
        load_trace(tmp_path / "empty.jsonl")
    with pytest.raises(TraceError, match="is a folder"):
        load_trace(tmp_path)


def test_make_trace_helper_counts_tokens_per_expert():
    trace = make_trace([("prefill", [[[0, 1], [1, 2], [1, 0]]])], num_experts=3, top_k=2)
    assert trace.tokens_per_expert(0, 0) == {0: 2, 1: 3, 2: 1}


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 9) | st.floats() | st.text(max_size=3),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["tok", "layers", "pass", "phase", "tokens", "experts", "weights", "x"]),
                        inner, max_size=5), max_leaves=20)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(JSON.map(json.dumps), st.binary(max_size=8).map(lambda b: b.decode("latin-1"))),
                min_size=0, max_size=4), st.booleans(), st.booleans())
def test_any_garbage_is_a_trace_error_or_a_trace(tmp_path, lines, with_header, long_int):
    path = tmp_path / "fuzz.jsonl"
    body = ([json.dumps(HEADER)] if with_header else []) + lines + (["1" * 5000] if long_int else [])
    path.write_bytes("\n".join(body).encode("utf-8") + b"\n")
    try:
        load_trace(path)
    except TraceError:
        pass
