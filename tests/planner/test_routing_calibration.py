"""Routing statistics per catalog model (planner/routing/published.py), synthetic traces calibrated to them
(calibrated.py), and the check that a model's statistics alone predict its recorded routing's hit rate."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from trace_factory import OLMOE, make_trace

from planner.catalog import load_model_shape
from planner.cli import main as cli_main
from planner.paths import PLANS, PROFILES, TRACES
from planner.profile import Profile
from planner.routing.published import MIXTRAL_TABLE5, mixtral_anchor, reuse_from_first_or_second
from planner.routing.statistics import trace_stats
from planner.routing.workload import calibrated_trace
from planner.tune.routing_check import statistics_only_check
from planner.tune.space import Space
from runtime.contracts.traces import load_trace

ROOT = TRACES.parent


def test_mixtral_table5_as_printed():
    """The means over the 8 Pile subsets of Table 5 (Jiang et al. 2024), and the paper's random baselines."""
    assert len(MIXTRAL_TABLE5) == 8
    assert [round(100 * x, 1) for x in mixtral_anchor(0)] == [14.1, 26.4, 22.7]
    assert [round(100 * x, 1) for x in mixtral_anchor(3)] == [48.0, 63.7, 50.9]
    assert mixtral_anchor(3, "min")[1] == pytest.approx(0.616) and mixtral_anchor(3, "max")[1] == pytest.approx(0.670)
    # uniform top-2 of 8: P(share an expert) = 1 - 6/8 * 5/7, reuse 2/8 under independent keeps (close to it)
    assert reuse_from_first_or_second(1 - 6 / 8 * 5 / 7) == pytest.approx(0.27, abs=0.01)


def test_repetition_statistics_need_rank_order():
    ranked = make_trace([("decode", [[[0, 1]]]), ("decode", [[[0, 2]]]), ("decode", [[[2, 0]]]),
                         ("decode", [[[3, 4]]])], num_experts=8, top_k=2)
    ranked = replace(ranked, header=replace(ranked.header, extra={"rank_order": True}))
    s = trace_stats(ranked).layers[0]
    assert s.first_choice_repeat == pytest.approx(1 / 3)  # 0 -> 0 repeats; 0 -> 2 and 2 -> 3 do not
    assert s.first_or_second_repeat == pytest.approx(2 / 3)  # {0,1}&{0,2}, {0,2}&{2,0}; not {2,0}&{3,4}
    unranked = replace(ranked, header=replace(ranked.header, extra={}))
    u = trace_stats(unranked).layers[0]
    assert u.first_choice_repeat is None and u.first_or_second_repeat == pytest.approx(2 / 3)  # top-2: a set
    olmoe = trace_stats(load_trace(OLMOE))  # ids sorted, top-8: neither is measurable
    assert olmoe.mean_first_choice_repeat is None and olmoe.mean_first_or_second_repeat is None
    tiny = trace_stats(load_trace(TRACES / "tiny-moe.jsonl"))  # recorded with gate weights: rank order kept
    assert tiny.mean_first_choice_repeat is not None and 0 < tiny.mean_first_choice_repeat < 1


@pytest.mark.parametrize("name", ["mixtral-8x7b", "mixtral-8x22b"])
def test_synthetic_trace_within_10_percent_of_published_statistics_layer_by_layer(name):
    shape = load_model_shape(name)
    cal, scenarios, source = calibrated_trace(shape, TRACES, seed=0)
    assert cal.targets.status == ("published" if name == "mixtral-8x7b" else "family")
    assert "Table 5" in cal.targets.sources["first_choice_repeat"] and "calibrated" in source
    if name == "mixtral-8x7b":
        assert cal.targets.published_layers == (0, 15, 31)
        at = {c.layer: c.target for c in cal.checks if c.statistic == "first_choice_repeat"}
        assert [round(100 * at[l], 1) for l in (0, 15, 31)] == [14.1, 26.4, 22.7]
    for statistic in ("first_choice_repeat", "first_or_second_repeat", "next_token_reuse"):
        checks = [c for c in cal.checks if c.statistic == statistic]
        assert len(checks) == shape.num_moe_layers
        worst = max(checks, key=lambda c: c.relative_error)
        assert worst.relative_error <= 0.10, worst
    # the spread's ends: less and more locality than the central trace, drawn the same way
    low, high = (trace_stats(scenarios[k]) for k in ("low", "high"))
    central = trace_stats(cal.trace)
    assert low.mean_first_or_second_repeat < central.mean_first_or_second_repeat < high.mean_first_or_second_repeat


def test_unpublished_model_is_assumed_with_a_spread_between_the_families():
    shape = load_model_shape("phi-3.5-moe")
    cal, scenarios, _ = calibrated_trace(shape, TRACES, seed=0)
    t = cal.targets
    assert t.status == "assumed" and t.assumed and set(scenarios) == {"low", "high"}
    assert "nothing published" in t.sources["next_token_reuse"] and "Mixtral" in t.sources["spread"]
    assert trace_stats(scenarios["low"]).mean_next_token_reuse < trace_stats(cal.trace).mean_next_token_reuse
    worst = cal.worst("next_token_reuse")
    assert worst.relative_error <= 0.10, worst


def test_a_synthetic_trace_offers_no_static_set():
    space = Space(max_budget=2, max_threads=1, ids_known=False)
    assert "static" not in space.policies and not any(c.policy == "static" for c in space.choices())
    assert any(c.preload for c in space.choices())  # a warm start stays
    assert "static" in Space(max_budget=2, max_threads=1).policies


@pytest.mark.parametrize("fraction,trials", [(0.25, 40), (0.5, 12)])
def test_statistics_alone_predict_the_recorded_tiny_moe_hit_rate(fraction, trials):
    """The embedded model's recorded trace: a plan tuned (a real Optuna study) on a synthetic trace fitted to
    its statistics alone hits within 10 % (relative) of what it hits on the recorded routing. At 25 % the
    40-trial study chose a prefetching plan that hit nothing while the recorded prompts' prefetch guesses
    leaked into the synthetic workload (the replays assume none): the check read 0 against 0."""
    shape = load_model_shape(str(ROOT / "models" / "tiny-moe"))
    recorded = load_trace(TRACES / "tiny-moe.jsonl")
    check = statistics_only_check(shape, recorded, "tiny-moe.jsonl", Profile.load(PROFILES / "rtx4070.yaml"),
                                  expert_fraction=fraction, trials=trials)
    tuned = check.tuned
    assert sum(tuned.plan.cache.slots) > 0 and tuned.recorded_decode_hit_rate > 0.1
    assert tuned.decode_relative_error <= 0.10, (tuned.synthetic_decode_hit_rate, tuned.recorded_decode_hit_rate)
    assert check.caching is tuned  # the tuned plan caches, so it is the plan the check holds to the statistics


def test_a_tuned_plan_without_a_cache_is_checked_through_the_studys_fastest_caching_plan():
    """Where the study keeps no cache (its hits 0 against 0 say nothing), the check replays the study's fastest
    plan whose slots take misses as it runs and that hits on the synthetic trace."""
    from planner.tune.routing_check import learns_from_routing

    shape = load_model_shape(str(ROOT / "models" / "tiny-moe"))
    recorded = load_trace(TRACES / "tiny-moe.jsonl")
    check = statistics_only_check(shape, recorded, "tiny-moe.jsonl", Profile.load(PROFILES / "rtx4090.yaml"),
                                  expert_fraction=0.1, trials=12)
    assert sum(check.tuned.plan.cache.slots) == 0 and check.tuned.recorded_decode_hit_rate == 0
    caching = check.caching
    assert caching is not None and caching is not check.tuned and learns_from_routing(caching.plan)
    assert caching.synthetic_decode_hit_rate >= 0.01 and caching.recorded_decode_hit_rate > 0
    assert caching.decode_relative_error <= 0.10


def test_explain_json_names_the_statistics_their_sources_and_the_spread(capsys):
    assert cli_main(["explain", str(PLANS / "rtx4070.yaml"), "--profile", str(PROFILES / "rtx4070.yaml"),
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    routing = out["routing"]
    assert routing["status"] == "published" and "Table 5" in routing["sources"]["first_choice_repeat"]
    fit = routing["statistics"]["first_choice_repeat"]
    assert len(fit["target"]) == len(fit["synthetic"]) == 32 and fit["max_relative_error"] <= 0.10
    lo, hi = out["decode_tokens_per_s_range"]
    assert lo <= out["decode_tokens_per_s"] <= hi and set(out["spread"]) == {"low", "high"}


def test_reuse_by_popularity_and_second_token_reuse_by_hand():
    # 8 experts, top-2; expert 0 in every token (the most popular), the partner alternates 1, 2, 1, 3
    t = make_trace([("decode", [[[0, 1]]]), ("decode", [[[0, 2]]]), ("decode", [[[0, 1]]]),
                    ("decode", [[[0, 3]]])], num_experts=8, top_k=2)
    s = trace_stats(t).layers[0]
    # distance 2: {0,1} vs {0,1} shares 2 of 2, {0,2} vs {0,3} shares 1 of 2
    assert s.second_token_reuse == pytest.approx((1.0 + 0.5) / 2)
    # quarters by popularity (2 experts each): {0, 1} kept 3 of 5 selections before a next token (0 thrice,
    # 1 never); {2, 3} (2 is tied with 3 at one use, id order) 0 of 1; the unused experts: no selection
    assert s.reuse_by_popularity == (pytest.approx(3 / 5), 0.0, None, None)


def test_generator_keeps_popular_experts_stickier_and_recalls_to_the_second_token_reuse():
    """Reuse by popularity quarter and the second-token reuse are what one next-token reuse figure leaves
    open; the generator lands on them (a uniform keep does not), at an unchanged mean reuse and skew."""
    from planner.routing.synthetic import fit_layer, synthesize_layers

    groups = (0.55, 0.33, 0.2, 0.1)
    p = fit_layer(0.3, 0.4, 16, 4, reuse_groups=groups, second_reuse=0.45)
    assert p.stickiness is not None and p.recall > 0
    s = trace_stats(synthesize_layers((p,), 16, 4, 2000, 3, fitted_from="test")).layers[0]
    assert s.next_token_reuse == pytest.approx(0.4, rel=0.02) and s.skew == pytest.approx(0.3, rel=0.05)
    assert s.second_token_reuse == pytest.approx(0.45, rel=0.05)
    for want, got in zip(groups, s.reuse_by_popularity):
        assert got == pytest.approx(want, abs=0.06)
    flat = trace_stats(synthesize_layers((fit_layer(0.3, 0.4, 16, 4),), 16, 4, 2000, 3, fitted_from="test")).layers[0]
    assert max(flat.reuse_by_popularity) - min(flat.reuse_by_popularity) < 0.05


def test_mixtral_assumes_the_recorded_reuse_profile_and_spreads_to_none():
    shape = load_model_shape("mixtral-8x7b")
    cal, _, _ = calibrated_trace(shape, TRACES, seed=0)
    t = cal.targets
    assert "olmoe" in t.sources["reuse_by_popularity"] and "assumed" in t.sources["reuse_by_popularity"]
    assert all(l.reuse_by_popularity is not None and l.reuse_by_popularity[0] > l.next_token_reuse
               > l.reuse_by_popularity[-1] for l in t.layers)
    assert all(l.reuse_by_popularity is not None for l in t.spread["low"])
    assert all(l.reuse_by_popularity is None for l in t.spread["high"])  # the one-step chain: more locality
