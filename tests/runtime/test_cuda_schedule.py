"""The CUDA execution order of DESIGN.md, checked through the runtime's device seam on a CPU machine.

A CUDA plan's model runs here with `RecordingDevice` (runtime/device.py) in place of the CUDA device: the
same layer code, the same calls in the same order, the arithmetic on CPU tensors. These tests check the
SCHEDULE the runtime asks the device for (which calls, in what order, how many of them block the host),
not that CUDA ran: no stream, event or copy engine is exercised. Because the stand-in computes, the tokens
must still be plain transformers' tokens, so conformance holds through the seam.

What each decode layer must look like (one segment = the calls from one layer's `fetch` to the next):
  fetch (the ONE blocking call: ids, gate weights and hidden states together; no ids under replay)
  -> waits for this layer's own pending copies only -> hit / accelerator-miss launches
  -> prefetch copies for the next layer -> this layer's promotions -> the CPU sum sent back (not blocking).
Accelerator misses (transfers) are double-buffered: transfer i+1's copy is queued before transfer i's
compute, each compute waits for its own copy only, and a destination (transfer buffer or slot) is written
only after the compute that last read it (`assert_transfers_double_buffered`).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from model_factory import num_experts
from test_conformance import TOL, make_plan, reference_gaps

from runtime.device import RecordingDevice
from runtime.loader import load_model
from runtime.replay import RoutingReplay
from runtime.session import Session

PROMPT = "def main(argv):\n    for name in"
NEW_TOKENS = 6
# plans that put work on every side: CPU misses only; hits, promotions and prefetch; accelerator misses
PLANS = {
    "zero-slots": dict(slots=0, policy="lru"),
    "promote-prefetch": dict(slots=2, policy="lru", promote=True, lookahead=1),
    "accelerator-misses": dict(slots=2, policy="fifo", compute="accelerator", transfer_min_tokens=2),
    # transfers that take no slot: copied into the two transfer buffers in turn
    "transfers-static": dict(slots=2, policy="static", preload="popular", compute="accelerator"),
    "transfers-zero-slots": dict(slots=0, policy="lru", compute="accelerator"),
    # fewer slots than top-k: two transfers of a pass can enter the same slot (only the last is copied there)
    "one-slot-transfers": dict(slots=1, policy="lru", compute="accelerator"),
}


def cuda_plan(spec: dict, config, accelerator: str = "cuda:0") -> object:
    """The conformance table's plan for `spec`, on `accelerator` whatever MOEPLAN_TEST_ACCELERATOR says."""
    plan = make_plan(spec, num_experts(config), config.num_hidden_layers)
    return plan.__class__.from_dict({**plan.to_dict(), "hardware": {"accelerator": accelerator, "cpu_threads": 2}})


def recorded_run(folder, config, spec: dict, replay: RoutingReplay | None = None, trace=None,
                 seam: RecordingDevice | None = None, outputs: list | None = None):
    """A CUDA plan's generation through a recording seam; `outputs` collects every MoE layer's output."""
    seam = seam if seam is not None else RecordingDevice()
    loaded = load_model(folder, "float32", "cpu")  # the stand-in's "device" memory is host memory
    session = Session(loaded, cuda_plan(spec, config), replay, seam=seam)
    marks: list[int] = []  # index of the first call of each forward pass
    begin = session.engine.begin_pass

    def begin_and_mark(phase, tokens):
        marks.append(len(seam.calls))
        begin(phase, tokens)

    session.engine.begin_pass = begin_and_mark
    for layer in session.engine.layers:  # where the compute stream lags, it catches up as each layer returns
        layer.forward = _settling(layer.forward, seam, outputs)
    result = session.generate(PROMPT, max_new_tokens=NEW_TOKENS, trace_out=trace)
    return session, seam, result, marks


def _settling(forward, seam: RecordingDevice, outputs: list | None):
    def settled(*args):
        out = forward(*args)
        seam.settle()
        if outputs is not None:
            outputs.append(out.clone())
        return out
    return settled


def segments(calls: list, start: int, end: int) -> list[list]:
    """The calls of one forward pass [start, end), cut at each layer's fetch."""
    out: list[list] = []
    for call in calls[start:end]:
        if call.kind == "fetch":
            out.append([])
        if out:
            out[-1].append(call)
    return out


def assert_layer_order(layer: int, seg: list, next_layer_prefetches: bool, calls: list) -> None:
    kinds = [c.kind for c in seg]
    assert kinds[0] == "fetch" and seg[0].layer == layer and seg[0].blocks_host
    assert not any(c.blocks_host for c in seg[1:]), f"layer {layer}: a second blocking call {seg}"
    for c in seg:
        if c.kind == "wait":  # a layer waits only for the copies into its own slots
            assert c.layer == layer
    first_launch = next((i for i, c in enumerate(seg) if c.kind == "launch"), len(seg))
    waits = [i for i, c in enumerate(seg) if c.kind == "wait" and calls[_event(c)].kind != "transfer"]
    assert all(i < first_launch for i in waits), "the wait comes before the hits read the slots"
    prefetch = [i for i, c in enumerate(seg) if c.kind == "background" and c.what.startswith("prefetch")]
    promote = [i for i, c in enumerate(seg) if c.kind == "background" and c.what == "promote"]
    launches = [i for i, c in enumerate(seg) if c.kind in ("launch", "transfer")]
    if prefetch and promote:
        assert max(prefetch) < min(promote), f"layer {layer}: prefetch queued after promotions {kinds}"
    for i in prefetch:
        assert seg[i].layer == layer + 1 and next_layer_prefetches
    for i in prefetch + promote:
        assert all(j < i for j in launches), "background copies are queued after the reads of this layer"
    sends = [i for i, c in enumerate(seg) if c.kind == "send" and c.what == "cpu sum"]
    indices = [i for i, c in enumerate(seg) if c.kind == "send" and c.what == "token indices"]
    assert len(indices) <= 1 and all(i < first_launch for i in indices), "one index copy, before the launches"
    assert len(sends) <= 1
    if sends:  # the CPU sum goes back last, after everything queued for the device and the copy engine
        assert sends[-1] == len(seg) - 1


def _event(wait) -> int:
    """The call a `wait` waits for (its event)."""
    return int(wait.what.rsplit(" ", 1)[1])


def assert_transfers_double_buffered(calls: list) -> int:
    """The transfers' order over a whole run (DESIGN.md, issue 20): transfer i+1's copy is queued before
    transfer i's compute; each compute waits for its own copy and for nothing queued after it; a transfer
    buffer or slot is written only after an event recorded after the compute that last read it. Returns
    how many transfers copied into a buffer that an earlier compute had read (the reuses checked)."""
    reader_of: dict[str, int] = {}  # destination -> index of the last launch that read it
    dest_of: dict[tuple[int, str], str] = {}  # (layer, expert) -> destination of its pending transfer
    reuses = 0
    pending_transfers: list[int] = []  # this layer's transfer copies whose compute is not queued yet
    previous_launch = -1
    for i, c in enumerate(calls):
        if c.kind == "transfer":
            expert, dest = c.what.split(" into ")
            dest_of[(c.layer, expert.split()[1])] = dest
            last = reader_of.get(dest)
            if last is not None and dest.startswith("buffer"):
                reuses += 1
                assert c.after is not None and c.after > last, f"call {i}: {dest} rewritten before its reader ran"
                # the event is the first record after that reader, and it is about this destination
                between = [j for j in range(last + 1, c.after + 1) if calls[j].kind == "record"]
                assert between == [c.after] and calls[c.after].what == f"read {dest}", f"call {i}: {c}"
            pending_transfers.append(i)
        if c.kind == "launch" and c.what.startswith("accelerator miss"):
            expert = c.what.split()[-1]
            mine = [j for j in pending_transfers if calls[j].what.startswith(f"transfer {expert} ")]
            assert len(mine) == 1, f"call {i}: accelerator miss {expert} without its own copy"
            later = [j for j in pending_transfers if j > mine[0]]
            remaining = [j for j in pending_transfers if j != mine[0]]
            # the next transfer's copy was queued before this compute (double-buffered), unless it is the last
            assert len(later) == 1 or not remaining, f"call {i}: next copy not queued before compute {c}"
            waits = [j for j in range(max(mine[0], previous_launch + 1), i) if calls[j].kind == "wait"]
            assert [_event(calls[j]) for j in waits] == [mine[0]], f"call {i}: waits {waits} for {mine[0]}"
            pending_transfers.remove(mine[0])
            reader_of[dest_of[(c.layer, expert)]] = i
            previous_launch = i
    return reuses


@pytest.mark.parametrize("name", PLANS)
def test_cuda_plan_schedule_and_tokens(name, checkpoint):
    folder, config = checkpoint("mixtral")
    spec = PLANS[name]
    session, seam, result, marks = recorded_run(folder, config, spec)
    layers = len(session.engine.layers)

    # conformance through the seam: the stand-in computes, so the tokens are transformers' tokens
    gaps = reference_gaps(folder, list(session.loaded.tokenizer(PROMPT)["input_ids"]), result.generated_ids)
    assert max(gaps) <= TOL, f"{name}: token off the reference argmax by {max(gaps):.3g}"

    # exactly one blocking host sync per MoE layer per forward pass (prefill and every decode token)
    marks.append(len(seam.calls))
    assert len(marks) - 1 == len(result.generated_ids)
    for p, (start, end) in enumerate(zip(marks, marks[1:])):
        blocking = [c for c in seam.calls[start:end] if c.blocks_host]
        assert len(blocking) == layers, f"{name} pass {p}: {len(blocking)} blocking calls for {layers} layers"
        segs = segments(seam.calls, start, end)
        assert [s[0].layer for s in segs] == list(range(layers))
        for layer, seg in enumerate(segs):
            nxt = session.engine.layers[layer].prefetch_into is not None
            assert_layer_order(layer, seg, nxt, seam.calls)
            if p > 0:  # a decode token: ids [1, k] int64, gate weights [1, k], hidden states [1, H] float32
                k, hidden = session.engine.top_k, config.hidden_size
                assert seg[0].nbytes == k * 8 + k * 4 + hidden * 4
                # no index copies for a decode token: at most the CPU sum goes to the device
                assert [c.what for c in seg if c.kind == "send"] in ([], ["cpu sum"])

    reuses = assert_transfers_double_buffered(seam.calls)
    stats = session.engine.stats()
    if name.startswith("transfers"):  # more transfers than buffers: both buffers written again
        assert reuses > 0 and stats["cache"]["misses"] > 0
        assert not any(c.kind == "transfer" and "slot" in c.what for c in seam.calls)
    if spec["slots"] == 0 and spec.get("compute", "cpu") == "cpu":  # every expert on the CPU: no launch
        assert not any(c.kind == "launch" for c in seam.calls)
        assert sum(1 for c in seam.calls if c.kind == "send") == layers * len(result.generated_ids)
    elif spec["slots"]:
        assert any(c.kind == "launch" and c.what.startswith("hit") for c in seam.calls)
    if spec.get("lookahead"):
        assert stats["prefetch"]["copies"] > 0
        assert any(c.kind == "background" and c.what.startswith("prefetch") for c in seam.calls)
    if spec.get("compute") == "accelerator":
        assert any(c.kind == "launch" and c.what.startswith("accelerator miss") for c in seam.calls)
    # page-locked in place: every expert byte, once
    expert_bytes = sum(t.numel() * t.element_size() for layer in session.engine.layers for t in layer.store.host)
    assert stats["locked_host_bytes"] == expert_bytes == seam.locked_bytes


def test_cuda_plan_takes_the_fused_token_kernel_for_its_cpu_misses(checkpoint):
    """Issue 20 item 6: a CUDA plan's decode token computes its CPU misses with the fused one-token kernel
    wherever a CPU plan's token would use it."""
    folder, config = checkpoint("mixtral")
    cpu = Session.load(cuda_plan(PLANS["zero-slots"], config, accelerator="cpu"), folder)
    seam = RecordingDevice()
    cuda = Session(load_model(folder, "float32", "cpu"), cuda_plan(PLANS["zero-slots"], config), seam=seam)
    assert [layer._cpu_token_dtype for layer in cuda.engine.layers] == \
        [layer._token_dtype for layer in cpu.engine.layers]
    calls: list[int] = []
    fused = cuda.engine.context.cpu.token

    def counting(x, chosen):
        calls.append(len(chosen))
        return fused(x, chosen)

    for layer in cuda.engine.layers:
        layer._fused_token = counting
    cuda.generate(PROMPT, max_new_tokens=3)
    if cpu.engine.layers[0]._token_dtype is not None:
        assert calls and all(n == cuda.engine.top_k for n in calls)  # decode tokens: every expert a CPU miss


def test_replayed_routing_adds_no_sync(checkpoint, tmp_path):
    """Issue 20 item 7: replayed ids are on the host already; the layer's one fetch brings the gate weights
    and hidden states only, and no other call blocks."""
    folder, config = checkpoint("mixtral")
    spec = PLANS["promote-prefetch"]
    trace = tmp_path / "routing.jsonl"
    _, _, first, _ = recorded_run(folder, config, spec, trace=trace)
    header = json.loads(trace.read_text().splitlines()[0])
    replay = RoutingReplay.load(trace, header["num_layers"], header["num_experts"], header["top_k"])
    session, seam, result, marks = recorded_run(folder, config, spec, replay=replay)
    layers = len(session.engine.layers)
    generation = seam.calls[marks[0]:]  # the engine's build ends with one synchronize (preloaded slots)
    assert sum(1 for c in generation if c.blocks_host) == layers * len(result.generated_ids)
    fetches = [c for c in seam.calls if c.kind == "fetch"]
    assert all(c.what == "2 tensors" for c in fetches)
    assert result.stats["cache"]["hits"] + result.stats["cache"]["misses"] > 0
    assert result.generated_ids == first.generated_ids  # the trace is this model's own routing


def _largest_difference(outputs: list, reference: list) -> float:
    """The largest difference between two runs' MoE layer outputs, relative to the output (inf where an
    output is not finite: weights read from a buffer never written can be anything)."""
    assert len(outputs) == len(reference)
    worst = 0.0
    for a, b in zip(outputs, reference):
        gap = float((a - b).abs().max() / b.abs().max())
        worst = max(worst, gap if math.isfinite(gap) else math.inf)
    return worst


@pytest.mark.parametrize("name", ["transfers-static", "transfers-zero-slots", "accelerator-misses",
                                  "one-slot-transfers"])
def test_transfers_conform_where_the_compute_stream_lags(name, checkpoint):
    """With copies landing as soon as they are issued and the launches held back (the other way the two
    streams can drift apart), the transfers' events alone keep each buffer's weights until its compute ran:
    the tokens are transformers', every MoE layer's output the one of the run where copies lag."""
    folder, config = checkpoint("mixtral")
    lagging: list = []
    session, seam, result, _ = recorded_run(folder, config, PLANS[name], seam=RecordingDevice(copies_land="early"),
                                            outputs=lagging)
    gaps = reference_gaps(folder, list(session.loaded.tokenizer(PROMPT)["input_ids"]), result.generated_ids)
    assert max(gaps) <= TOL, f"{name}: token off the reference argmax by {max(gaps):.3g}"
    reference: list = []
    recorded_run(folder, config, PLANS[name], outputs=reference)
    assert _largest_difference(lagging, reference) < 1e-5
    assert assert_transfers_double_buffered(seam.calls) > 0 or name == "accelerator-misses"


class _WithoutTransferWaits(RecordingDevice):
    """The schedule with one kind of wait removed: each compute's wait for its own transfer copy."""

    def wait(self, layer, event):
        if self.calls[event].kind == "transfer":
            return
        super().wait(layer, event)


class _WithoutBufferEvents(RecordingDevice):
    """The schedule with the other kind removed: a transfer copy's wait for its buffer's last reader."""

    def transfer_copy(self, layer, what, pairs, after=None):
        return super().transfer_copy(layer, what, pairs, None)


@pytest.mark.parametrize("broken, copies_land", [(_WithoutTransferWaits, "late"), (_WithoutBufferEvents, "early")])
def test_removing_a_transfer_wait_breaks_conformance(broken, copies_land, checkpoint):
    """Each wait of the double-buffered transfers is needed: without it the stand-in computes with weights
    that are not yet, or no longer, the expert's, and the MoE layers' outputs leave the conforming run's
    (by far more than rounding; the tokens of this small random model may or may not change with them).
    The checks above would pass a schedule that needed no wait: this shows they can fail."""
    folder, config = checkpoint("mixtral")
    spec = PLANS["transfers-zero-slots"]
    reference: list = []
    recorded_run(folder, config, spec, outputs=reference)
    outputs: list = []
    recorded_run(folder, config, spec, seam=broken(copies_land=copies_land), outputs=outputs)
    assert _largest_difference(outputs, reference) > 1e-2, f"{broken.__name__}: the outputs still conform"


@pytest.mark.parametrize("name", ["transfers-zero-slots", "zero-slots"])
def test_the_transfer_buffers_are_what_tune_promises_and_run_guards(name, checkpoint):
    """One accounting (runtime/contracts/memory.py): the bytes the transfer buffers take once a transfer plan
    has run are the `transfer_scratch` that the runtime's guard checks and the planner's memory plan (what
    `tune` promises) counts, two experts, one pair for all layers; a plan that transfers nothing allocates
    none and is charged none."""
    from planner.cost_model import memory_plan as planned_memory
    from planner.paths import PROFILES
    from planner.profile import Profile
    from runtime.contracts.schedule import TRANSFER_BUFFERS
    from runtime.loader import inspect_model
    from runtime.memory_guard import memory_plan as guarded_memory

    folder, config = checkpoint("mixtral")
    session, _, _, _ = recorded_run(folder, config, PLANS[name])
    plan, layers = session.plan, session.engine.layers
    buffers = layers[0].store.transfer
    assert all(layer.store.transfer is buffers for layer in layers)
    shape = inspect_model(folder, "float32")
    slots = plan.cache.slots_per_layer(shape.num_moe_layers, shape.num_experts)
    # the guard's items for these slots, on the host here (the stand-in's device memory is host memory)
    guarded = guarded_memory(shape, slots, torch.device("cpu"), 64, host_available=lambda: None,
                             host_total=lambda: None, rule=plan.miss.rule)[0].items
    promised, _ = planned_memory(Profile.load(PROFILES / "rtx4070.yaml"), shape, plan, context=64, prompt_tokens=16)
    expected = TRANSFER_BUFFERS * shape.expert_bytes if name.startswith("transfers") else 0
    assert buffers.allocated_bytes() == guarded["transfer_scratch"] == expected
    assert promised["accelerator"]["transfer_scratch"] == expected
