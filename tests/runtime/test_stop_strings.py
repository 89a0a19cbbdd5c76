"""Stop strings over streamed pieces: what is emitted is exactly the text before the first stop string,
however the text is cut into pieces."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.stop_strings import StopMatcher


def run(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces)
    if not matcher.stopped:
        out += matcher.flush()
    return out, matcher.stopped


def test_a_stop_string_across_pieces_is_cut_and_never_shown():
    matcher = StopMatcher(["\n\nUser:"])
    assert matcher.feed("Hello\n") == "Hello"  # "\n" might start the stop string: held back
    assert matcher.feed("\nUs") == ""
    assert matcher.feed("er: more") == "" and matcher.stopped
    assert matcher.feed("after") == ""


def test_a_held_prefix_that_does_not_complete_is_released():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("go ST") == "go "
    assert matcher.feed("ART") == "START"
    assert matcher.feed("x S") == "x "
    assert matcher.flush() == "S" and not matcher.stopped


def test_the_earliest_of_several_stops_wins():
    assert run(["abcXYdefZ"], ["Z", "XY"]) == ("abc", True)


def test_empty_stop_string_is_refused():
    with pytest.raises(ValueError, match="stop"):
        StopMatcher(["a", ""])


@given(text=st.text(alphabet="ab\n", max_size=40), stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4),
                                                               max_size=3),
       cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10))
def test_any_cutting_gives_the_text_before_the_first_stop(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[:min(hits)] if hits else text
    assert run(pieces, stops) == (expected, bool(hits))
