"""Stop sequences on streamed text: emit what cannot be the start of a stop string, hold back what might be.

OpenAI's `stop`: generation ends where any stop string first appears, and the returned text excludes it.
A stop string can span several tokens, so the tail of the text that is a prefix of a stop string waits
until the next piece settles it.
"""
from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    def __init__(self, stops: Sequence[str] = ()) -> None:
        if any(not s for s in stops):
            raise ValueError("stop: a stop string must not be empty")
        self.stops = tuple(stops)
        self.held = ""  # text received but not emitted: a possible start of a stop string
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of `held + text` that is safe to emit; sets `stopped` once a stop string appears."""
        if self.stopped:
            return ""
        buffer = self.held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.held, self.stopped = "", True
            return buffer[:cut]
        keep = self._partial_suffix(buffer)
        self.held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep]

    def flush(self) -> str:
        """At the end of generation: what was held back was not a stop string after all."""
        held, self.held = self.held, ""
        return held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest end of `buffer` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best
