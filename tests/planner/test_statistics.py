from __future__ import annotations

import json

import pytest
from trace_factory import OLMOE, make_trace

from planner.cli import main as cli_main
from planner.routing.statistics import GuessAccuracy, best_ranks, guess_accuracy, measure_guess_accuracy, top_share, trace_stats
from runtime.contracts.traces import Trace, TracePass, load_trace


def test_stats_by_hand():
    # 2 layers, 10 experts, top-2; prefill of 2 tokens then 2 decode tokens
    trace = make_trace([("prefill", [[[0, 1], [0, 2]], [[0, 1], [5, 6]]]),
                        ("decode", [[[0, 1]], [[0, 9]]]),
                        ("decode", [[[3, 4]], [[3, 4]]])], num_experts=10, top_k=2)
    s = trace_stats(trace, window=2)
    l0, l1 = s.layers
    assert s.tokens == 4 and l0.selections == 8
    assert l0.skew == 3 / 8  # top 10% of 10 experts = expert 0, chosen 3 times of 8
    assert l0.next_token_reuse == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert l0.cross_layer_reuse == pytest.approx((2 / 2 + 0 + 1 / 2 + 2 / 2) / 4)
    assert l1.cross_layer_reuse is None
    assert l0.working_set_window == pytest.approx((3 + 3 + 4) / 3) and l0.working_set_total == 5
    # a prefill pass starts a new sequence: no reuse counted across it
    again = make_trace([("decode", [[[0, 1]]]), ("prefill", [[[0, 1]]])], num_experts=4, top_k=2)
    assert trace_stats(again).layers[0].next_token_reuse == 0.0


def test_top_share_counts_ceil_of_ten_percent():
    assert top_share([5] + [1] * 10) == pytest.approx((5 + 1) / 15)  # 11 experts: the top 2
    assert top_share([0, 0]) == 0.0


def test_olmoe_stats_match_its_readme():
    s = trace_stats(load_trace(OLMOE))
    assert s.tokens == 299
    assert s.mean_next_token_reuse == pytest.approx(0.43, abs=0.01)
    reuse = [x.next_token_reuse for x in s.layers]
    assert min(reuse) == pytest.approx(0.33, abs=0.01) and max(reuse) == pytest.approx(0.52, abs=0.01)
    assert 0.25 < s.mean_skew < 0.45  # far from uniform routing (7/64 = 0.11)
    assert 0.09 < s.mean_cross_layer_reuse < 0.2  # near the id-coincidence level k/E = 0.125
    assert all(8 <= x.working_set_window <= 64 for x in s.layers)


def test_trace_stats_command_table_and_json(capsys):
    assert cli_main(["trace", "stats", str(OLMOE)]) == 0
    table = capsys.readouterr().out
    assert "16 MoE layers, 64 experts, top-8, 299 tokens" in table and table.splitlines()[-1].startswith(" mean")
    assert cli_main(["trace", "stats", str(OLMOE), "--json", "--model-name", "olmoe"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"] == "olmoe" and len(data["layers"]) == 16
    assert data["mean"]["next_token_reuse"] == pytest.approx(0.435, abs=0.005)


def test_trace_command_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"tok": 1, "layers": [[0, 1]]}\n{"tok": 2}\n')
    assert cli_main(["trace", "stats", str(tmp_path / "bad.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"moeplan trace: error: {tmp_path / 'bad.jsonl'}:2: row is missing key 'layers'"
    assert cli_main(["trace", "--model", str(tmp_path)]) == 1
    assert "recording needs --prompts, --out" in capsys.readouterr().err


def test_trace_records_all_prompts_into_one_trace(checkpoint, tmp_path):
    folder, config = checkpoint("mixtral")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main():\n\nimport os\n")
    out = tmp_path / "traces" / "tiny.jsonl"
    assert cli_main(["trace", "--model", str(folder), "--prompts", str(prompts), "--out", str(out),
                     "--max-new-tokens", "3", "--dtype", "float32"]) == 0
    trace = load_trace(out)
    h = trace.header
    assert (h.num_layers, h.num_experts, h.top_k, h.source) == (config.num_hidden_layers, 8, 2, "recorded")
    assert h.extra["prompts"] == 2
    assert [p.index for p in trace.passes] == list(range(len(trace.passes)))
    assert [p.phase for p in trace.passes].count("prefill") == 2 and trace.passes[0].phase == "prefill"
    assert len(trace.decode_passes()) <= 4 and all(p.tokens == 1 for p in trace.decode_passes())
    assert trace.passes[0].tokens > 1 and trace.passes[0].weights is not None


def _with_guesses(trace: Trace, guesses: list[list[list[int]]]) -> Trace:
    return Trace(trace.header, tuple(TracePass(p.index, p.phase, p.tokens, p.experts, None,
                                               tuple(tuple(g) for g in gs)) for p, gs in zip(trace.passes, guesses)))


def test_guess_accuracy_by_layer_and_rank():
    # 3 layers, top-2. Layer 1: the top-1 expert is always guessed, the second never; layer 2: both guessed
    # once of two passes. A prefill token's rank is its best among the tokens (expert 3: rank 0 by token 2).
    trace = make_trace([("decode", [[[0, 1]], [[2, 3]], [[4, 5]]]),
                        ("decode", [[[0, 1]], [[3, 2]], [[4, 5]]]),
                        ("prefill", [[[0, 1], [1, 0]], [[2, 0], [3, 2]], [[4, 5], [5, 4]]])], num_experts=6, top_k=2)
    guessed = _with_guesses(trace, [[[], [2], [4, 5]], [[], [3, 5], [0, 1]], [[], [2, 3], [4, 5]]])
    measured = measure_guess_accuracy(guessed, ("decode",))
    assert measured.by_layer_rank == ((), (1.0, 0.0), (0.5, 0.5)) and measured.overall == 0.5
    assert measured.of(1, 0) == 1.0 and measured.of(1, 5) == 0.5  # a rank never seen: the overall share
    assert guess_accuracy(guessed, ("decode",)) == 0.5
    assert best_ranks(trace, 2, 1) == {2: 0, 0: 1, 3: 0}  # expert 2: rank 0 by the first token, 1 by the second
    every = measure_guess_accuracy(guessed)  # with the prefill pass: its rank-0 experts 2 and 3 were guessed
    assert every.by_layer_rank[1] == (1.0, 0.0) and every.overall == 8 / 13
    assert measure_guess_accuracy(trace) is None and guess_accuracy(trace) is None
    assert isinstance(measured, GuessAccuracy)
