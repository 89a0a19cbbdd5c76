"""The committed tiny MoE (models/tiny-moe) is a real, trained model: it loads with plain
transformers, writes plausible Python, and routes non-uniformly on text it never saw.

Thresholds come from bench/results/routing_tiny_moe.md and models/tiny-moe/README.md (measured on
the committed checkpoint); each sits well below the measured value and well above what uniform
routing, or for the loss an untrained model, gives.
"""

from __future__ import annotations

import importlib.util
import keyword
import math
import re
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "tiny-moe"
TRACES = ROOT / "traces"
SIZE_LIMIT_BYTES = 30 * 1000 * 1000  # the checkpoint budget of issue 8
# On the first 256 held-out tokens the committed model measured: cross-entropy 5.03 nats (a random
# init of the same config: 8.41; uniform over the 4096-token vocabulary: ln 4096 = 8.32); per-layer
# top-25% share 0.559 / 0.658 / 0.611 / 0.717 and next-token reuse 0.461 / 0.618 / 0.588 / 0.633,
# where uniform routing gives 0.25 and 0.25 (8 experts, top-2).
MAX_HELDOUT_LOSS = 6.0
SHARE_MARGIN = 0.15  # share must reach uniform + 0.15 = 0.40
REUSE_MARGIN = 0.10  # reuse must reach uniform + 0.10 = 0.35


@pytest.fixture(scope="module")
def torch_one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the test machine is shared; small shapes run fine on one thread
    yield torch
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(torch_one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch_one_thread.float32)
    model.eval()
    return model, tok


def heldout_ids(tok, n_tokens: int) -> list[int]:
    """Tokens of the first stdlib files the training script held out (listed in the checkpoint)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = (MODEL_DIR / "heldout_files.txt").read_text().split()
    ids: list[int] = []
    for name in names:
        if (stdlib / name).is_file():
            ids += tok((stdlib / name).read_text(encoding="utf-8", errors="replace"))["input_ids"]
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    raise AssertionError(f"{MODEL_DIR}/heldout_files.txt: fewer than {n_tokens} tokens found under {stdlib}")


def test_checkpoint_is_small_and_complete():
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "heldout_files.txt"} <= names
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir() if p.is_file())
    assert total <= SIZE_LIMIT_BYTES, f"{MODEL_DIR}: {total} bytes > {SIZE_LIMIT_BYTES}"


def test_loads_as_mixtral_moe(tiny):
    model, tok = tiny
    cfg = model.config
    assert cfg.model_type == "mixtral"
    assert cfg.num_local_experts > cfg.num_experts_per_tok >= 1
    assert tok.bos_token == "<s>" and tok.eos_token == "</s>"
    assert tok("x = 1")["input_ids"][0] == tok.bos_token_id
    assert tok.decode(tok("x = 1\n")["input_ids"], skip_special_tokens=True) == "x = 1\n"


def test_heldout_loss_shows_training(tiny, torch_one_thread):
    model, tok = tiny
    ids = torch_one_thread.tensor([heldout_ids(tok, model.config.max_position_embeddings)])
    with torch_one_thread.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert loss < MAX_HELDOUT_LOSS, f"held-out cross-entropy {loss:.3f} nats"


def test_greedy_python_is_not_degenerate(tiny, torch_one_thread):
    model, tok = tiny
    # The model is weak (about 2 M training tokens): after a bare "def f(n):\n" it falls into a
    # repeated "#" line; after a started statement it writes Python (README has the samples).
    ids = tok("def fibonacci(n):\n    if", return_tensors="pt")["input_ids"]
    with torch_one_thread.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    text = tok.decode(new, skip_special_tokens=True)
    words = set(re.findall(r"[A-Za-z_]+", text))
    assert words & set(keyword.kwlist), f"no Python keyword in greedy output {text!r}"
    # The committed model wrote 18 distinct tokens of 40 here, including else / not / return.
    assert len(set(new)) >= 8, f"only {len(set(new))} distinct tokens in {text!r}"


def test_routing_on_heldout_text_is_skewed(tiny, torch_one_thread):
    model, tok = tiny
    cfg = model.config
    e, k = cfg.num_local_experts, cfg.num_experts_per_tok
    ids = torch_one_thread.tensor([heldout_ids(tok, cfg.max_position_embeddings)])
    with torch_one_thread.no_grad():
        out = model(input_ids=ids, output_router_logits=True)
    n_top = math.ceil(0.25 * e)
    uniform_share = n_top / e
    uniform_reuse = k / e
    for layer, logits in enumerate(out.router_logits):
        top = torch_one_thread.topk(logits, k, dim=-1).indices.tolist()
        counts = Counter(x for row in top for x in row)
        share = sum(c for _, c in counts.most_common(n_top)) / sum(counts.values())
        reuse = sum(len(set(a) & set(b)) for a, b in zip(top, top[1:])) / (k * (len(top) - 1))
        # Measured values and margins: see the constants at the top. A random init routes skewed
        # too (its router sees correlated hidden states), so this checks the routing property the
        # cache relies on, not that training happened: test_heldout_loss_shows_training does that.
        assert share >= uniform_share + SHARE_MARGIN, f"layer {layer}: top-25% share {share:.3f}"
        assert reuse >= uniform_reuse + REUSE_MARGIN, f"layer {layer}: next-token reuse {reuse:.3f}"


def _routing_stats_module():
    spec = importlib.util.spec_from_file_location("routing_stats_tiny", ROOT / "bench" / "diagnostics" / "routing_stats_tiny.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def test_routing_stats_arithmetic():
    rs = _routing_stats_module()
    # 8 experts, top-2: expert 0 in every token, partner alternates 1, 2, 1, 2.
    rows = [[0, 1], [0, 2], [0, 1], [0, 2]]
    s = rs.layer_stats(rows, num_experts=8, window=2)
    assert s.top10_share == pytest.approx(4 / 8)  # ceil(0.8) = 1 expert: expert 0, 4 of 8 selections
    assert s.top25_share == pytest.approx(6 / 8)  # 2 experts: 0 and 1 (or 2), 4 + 2 of 8
    assert s.window_top25_share == pytest.approx(3 / 4)  # each 2-token window: expert 0 twice + one once, of 4
    assert s.reuse == pytest.approx(0.5)
    base = rs.uniform_baseline(8, 2, window=32)
    assert (base.top10_share, base.top25_share, base.reuse) == (0.125, 0.25, 0.25)
    assert 0.25 < base.window_top25_share < 0.5


def test_olmoe_trace_reuse_matches_its_readme():
    trace = TRACES / "olmoe-1b-7b-decode-299.jsonl"
    rs = _routing_stats_module()
    layers, e, k = rs.trace_routing(trace)
    assert (len(layers), e, k) == (16, 64, 8)
    mean_reuse = sum(rs.layer_stats(rows, e, 32).reuse for rows in layers) / len(layers)
    assert mean_reuse == pytest.approx(0.43, abs=0.01)  # the trace README's measured value
