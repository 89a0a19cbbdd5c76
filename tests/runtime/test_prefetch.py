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


def test_copy_stream_bookkeeping_through_the_seam():
    """On a CUDA plan a background copy goes through the device seam's copy stream and leaves one pending
    event for its own layer, which that layer's next start waits for once (the recording stand-in of
    runtime/device.py: this checks the bookkeeping, not that CUDA ran)."""
    import torch

    from runtime.device import RecordingDevice
    from runtime.prefetch import Prefetcher

    class Store:
        def slot_copies(self, expert, slot):
            return [(torch.zeros(5, dtype=torch.int16), torch.full((5,), expert, dtype=torch.int16))]

    seam = RecordingDevice()
    prefetcher = Prefetcher(seam, num_layers=2, top_k=2)
    assert prefetcher.copy(1, Store(), [(4, 0), (5, 1)]) == 20
    prefetcher.wait(0)  # nothing pending for layer 0
    prefetcher.wait(1)
    prefetcher.wait(1)  # waited once: nothing pending any more
    assert [(c.kind, c.layer, c.what, c.nbytes) for c in seam.calls] == [
        ("background", 1, "promote", 20), ("wait", 1, "copies of call 0", 0)]
    assert seam.blocking() == 0
