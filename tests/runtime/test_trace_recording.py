"""The runtime writes traces through the contract's one writer and replays them through its one reader."""
from __future__ import annotations

import json

import pytest
import torch

from runtime.contracts.traces import TraceRecorder, header_record, load_trace, pass_record
from runtime.errors import TraceError
from runtime.replay import RoutingReplay


def test_recorded_passes_read_back(tmp_path):
    recorder = TraceRecorder(num_layers=2)
    recorder.begin_pass(0, "prefill", 2)
    recorder.record(0, [[3, 1], [0, 2]], [[0.6, 0.4], [0.123456789, 0.876543211]])
    recorder.record(1, [[1, 2], [2, 3]], [[0.5, 0.5], [0.7, 0.3]])
    recorder.begin_pass(1, "decode", 1)
    recorder.record(0, [[2, 0]], [[0.9, 0.1]])
    recorder.record(1, [[3, 0]], [[0.8, 0.2]])
    path = recorder.write(tmp_path / "t.jsonl", header_record("m", 2, 4, 2, prompt="p", dtype="bfloat16"))
    trace = load_trace(path, num_experts=4, top_k=2)
    assert (trace.header.model, trace.header.num_layers, trace.header.extra) == ("m", 2, {"prompt": "p",
                                                                                         "dtype": "bfloat16"})
    assert [(p.index, p.phase, p.tokens) for p in trace.passes] == [(0, "prefill", 2), (1, "decode", 1)]
    assert trace.passes[0].experts == (((3, 1), (0, 2)), ((1, 2), (2, 3)))
    assert trace.passes[0].weights[0][1] == (0.123457, 0.876543)  # six decimals


def test_records_keep_the_documented_shape():
    assert header_record("m", 3, 8, 2, "synthetic", seed=1) == {
        "trace": 1, "model": "m", "num_layers": 3, "num_experts": 8, "top_k": 2, "source": "synthetic", "seed": 1}
    assert "weights" not in pass_record(0, "decode", 1, [[[1, 2]]])
    with pytest.raises(ValueError, match="phase"):
        pass_record(0, "generate", 1, [[[1, 2]]])
    with pytest.raises(ValueError, match="source"):
        header_record("m", 3, 8, 2, "guessed")


def test_replay_reads_both_formats(tmp_path):
    compact = tmp_path / "compact.jsonl"
    compact.write_text("".join(json.dumps({"tok": t, "layers": [[t % 4, (t + 1) % 4], [1, 0]]}) + "\n"
                               for t in range(3)))
    replay = RoutingReplay.load(compact, num_layers=2, num_experts=4, top_k=2)
    assert replay.ids(0, 0, 2).tolist() == [[0, 1], [1, 2]]
    assert replay.ids(1, 1, 2).tolist() == [[1, 0], [1, 0]]  # wraps around

    recorder = TraceRecorder(num_layers=3)  # a bigger model's trace replays its first layers and ranks
    recorder.begin_pass(0, "decode", 1)
    for layer in range(3):
        recorder.record(layer, [[layer, 5, 6]], [[0.5, 0.3, 0.2]])
    path = recorder.write(tmp_path / "moeplan.jsonl", header_record("big", 3, 8, 3))
    replay = RoutingReplay.load(path, num_layers=2, num_experts=8, top_k=2)
    assert replay.ids(0, 1, 1).tolist() == [[1, 5]]


@pytest.mark.parametrize("text,expected", [
    ("", "empty trace file"),
    ('{"tok": 0, "layers": [[0, 1]]}\nnot json\n', ":2: not valid JSON"),
    ('{"tok": 0, "layers": [[0, 1]]}\n', "token 0 has 1 layers, the model has 2 MoE layers"),
    ('{"tok": 0, "layers": [[0, 9], [0, 1]]}\n', "experts [0, 9] are not 2 distinct ids below 4"),
    (json.dumps(header_record("m", 2, 4, 2)) + "\n", "no routing records"),
])
def test_replay_errors_are_one_line(tmp_path, text, expected):
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    with pytest.raises(TraceError) as err:
        RoutingReplay.load(path, num_layers=2, num_experts=4, top_k=2)
    assert expected in str(err.value) and "\n" not in str(err.value)
