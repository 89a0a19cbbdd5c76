"""Prefetch (lookahead 1) on the CPU: guesses enter the next layer's cache through the contract's admission,
change no token, and are counted where the layer counts its pass."""
from __future__ import annotations

from model_factory import num_experts
from test_conformance import make_plan

from runtime.session import Session


def test_prefetch_copies_and_counts(checkpoint):
    folder, config = checkpoint("olmoe")
    experts, layers = num_experts(config), config.num_hidden_layers
    spec = dict(slots=4, policy="lru", promote=True)
    results = {}
    for lookahead in (0, 1):
        session = Session.load(make_plan({**spec, "lookahead": lookahead}, experts, layers), folder)
        results[lookahead] = session.generate("def main(argv):", max_new_tokens=12)
        per_layer = [layer.stats for layer in session.engine.layers]
        if lookahead:
            assert per_layer[0].prefetch_copies == 0  # no layer before the first guesses for it
            assert sum(s.prefetch_copies for s in per_layer[1:]) > 0
            assert all(s.prefetch_right <= s.hits + s.misses for s in per_layer)
            assert [layer.prefetch_into for layer in session.engine.layers] == session.engine.layers[1:] + [None]
    assert results[0].generated_ids == results[1].generated_ids  # prefetch moves weights, never changes them
    stats = results[1].stats
    assert stats["prefetch"]["copies"] > 0 and stats["prefetch"]["right"] > 0
    assert results[0].stats["prefetch"] == {"copies": 0, "right": 0}


def test_copy_stream_bookkeeping_with_fake_cuda(monkeypatch):
    """On CUDA a background copy waits for the compute stream's queued work, runs on the copy stream and
    leaves one pending event for its own layer, which that layer's next start waits for once (stand-ins for
    torch.cuda's stream and event: no GPU needed)."""
    import contextlib

    import torch

    from runtime.prefetch import Prefetcher

    log = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append((self.name, "waits for", other.name))

        def wait_event(self, event):
            log.append((self.name, "waits on", event.name))

    class Event:
        count = 0

        def __init__(self):
            Event.count += 1
            self.name = f"event{Event.count}"

        def record(self, stream):
            log.append((stream.name, "records", self.name))

    compute = Stream("compute")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream("copy"))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: compute)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())

    class Store:
        def copy_to_slot(self, expert, slot):
            log.append(("copy", expert, slot))
            return 10

    prefetcher = Prefetcher(torch.device("cuda", 0), num_layers=2, top_k=2)
    assert prefetcher.copy(1, Store(), [(4, 0), (5, 1)]) == 20
    prefetcher.wait(0)  # nothing pending for layer 0
    prefetcher.wait(1)
    prefetcher.wait(1)  # waited once: nothing pending any more
    assert log == [("copy", "waits for", "compute"), ("copy", 4, 0), ("copy", 5, 1), ("copy", "records", "event1"),
                   ("compute", "waits on", "event1")]
