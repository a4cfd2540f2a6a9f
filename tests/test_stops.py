"""StopStrings over streamed pieces: never leak a stop string, never lose or repeat text."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accordion.engine.stops import StopStrings


@dataclass
class Run:
    emitted: list[str]  # what each feed returned, up to and including the stopping one
    hit: bool
    flushed: str

    @property
    def text(self) -> str:
        return "".join(self.emitted) + self.flushed


def stream(stops: list[str], pieces: list[str]) -> Run:
    """Feed pieces until a stop hits (the engine stops there), then flush."""
    s = StopStrings(stops)
    emitted: list[str] = []
    for piece in pieces:
        out, hit = s.feed(piece)
        emitted.append(out)
        if hit:
            return Run(emitted, True, s.flush())
    return Run(emitted, False, s.flush())


def chars(text: str) -> list[str]:
    return list(text)


def test_no_stops_passes_pieces_through() -> None:
    assert stream([], ["a<", "b"]).emitted == ["a<", "b"]
    assert stream([""], ["a<", "b"]).emitted == ["a<", "b"]  # empty stop strings are ignored


def test_stop_inside_one_piece_cuts_there() -> None:
    r = stream(["STOP"], ["Hello STOP world"])
    assert r.hit and r.emitted == ["Hello "] and r.flushed == ""


def test_stop_split_over_many_pieces_is_never_emitted() -> None:
    stop = "<|im_end|>"
    r = stream([stop], ["Hi", " there", *chars(stop), " more"])
    assert r.hit and r.text == "Hi there"
    assert all(c not in "".join(r.emitted) for c in "<|>")  # not even a prefix leaked


def test_text_before_the_stop_is_emitted_exactly_once() -> None:
    r = stream(["</s>"], ["ab", "c<", "/", "s>tail"])
    assert r.hit and r.emitted == ["ab", "c", "", ""] and r.flushed == ""


def test_held_text_that_is_not_a_stop_is_released_by_the_next_piece() -> None:
    r = stream(["</s>"], ["a<", "/", "x", "y"])
    assert not r.hit
    assert r.emitted == ["a", "", "</x", "y"]


def test_held_text_is_released_by_flush() -> None:
    r = stream(["</s>"], ["a<", "/"])
    assert not r.hit and r.emitted == ["a", ""] and r.flushed == "</"


def test_flush_after_a_stop_releases_nothing() -> None:
    s = StopStrings(["ab"])
    assert s.feed("xa") == ("x", False)
    assert s.feed("bc") == ("", True)
    assert s.flush() == ""


def test_earliest_of_several_stop_strings_wins() -> None:
    assert stream(["END", "STOP"], ["one STOP two END"]).text == "one "
    assert stream(["END", "STOP"], ["one END two STOP"]).text == "one "
    assert stream(["END", "STOP"], chars("one STOP two END")).text == "one "


def test_stops_sharing_a_prefix() -> None:
    assert stream(["abc", "abd"], ["x", "ab", "d", "y"]).text == "x"
    assert stream(["abc", "abd"], ["x", "ab", "c"]).text == "x"
    r = stream(["abc", "abd"], ["x", "ab", "e"])
    assert not r.hit and r.text == "xabe"


def test_one_stop_a_prefix_of_another() -> None:
    r = stream(["ab", "abc"], ["x", "a", "b", "c"])
    assert r.hit and r.text == "x"


@pytest.mark.parametrize("stops", [["ab", "xyz"], ["xyz", "ab"]])
def test_holds_the_longest_suffix_that_could_start_any_stop(stops: list[str]) -> None:
    s = StopStrings(stops)
    assert s.feed("123xy") == ("123", False)  # "xy" may become "xyz"
    assert s.feed("a") == ("xy", False)  # "a" may become "ab"
    assert s.feed("b") == ("", True)


@pytest.mark.parametrize("stops", [["aab", "ab"], ["ab", "aab"]])
def test_longer_partial_match_wins_over_a_shorter_one(stops: list[str]) -> None:
    s = StopStrings(stops)
    assert s.feed("xaa") == ("x", False)  # "aa" may become "aab", not only "a" -> "ab"
    assert s.feed("b") == ("", True)


def test_self_overlapping_stop() -> None:
    assert stream(["aab"], chars("xaaab")).text == "xa"
    r = stream(["aab"], chars("xaaa"))
    assert not r.hit and "".join(r.emitted) == "xa" and r.flushed == "aa"


@pytest.mark.parametrize("stop", ["\n\n", "User:", "é!", "👍"])
def test_empty_pieces_and_unicode(stop: str) -> None:
    text = f"ça va 👋{stop}rest"
    pieces = [p for c in text for p in (c, "")]
    assert stream([stop], pieces).text == "ça va 👋"


# -- property: any split gives the one-piece answer ------------------------------------


def first_stop_cut(text: str, stops: list[str]) -> str:
    """Cut where a token-by-token stream would: at the stop that completes first."""
    found = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    return text[: min(found)[1]] if found else text


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(points, points[1:], strict=False)]


# nested stops included: with "b<a" and "<", "b<" + "a" and "b<a" must both stop at "<"
stop_lists = st.lists(st.text("ab<", min_size=1, max_size=4), min_size=1, max_size=3)


@settings(max_examples=400, deadline=None)
@given(
    text=st.text("ab<c", max_size=30),
    stops=stop_lists,
    cuts=st.lists(st.integers(0, 1000), max_size=30),
)
def test_any_split_emits_text_up_to_the_first_stop(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    pieces = split(text, cuts)
    assert "".join(pieces) == text
    expected = first_stop_cut(text, stops)
    r = stream(stops, pieces)
    assert r.text == expected
    assert r.hit == (expected != text)
    seen = ""
    for out in r.emitted:  # no stop ever leaks, even partially combined with later text
        seen += out
        assert not any(s in seen for s in stops)


@settings(max_examples=200, deadline=None)
@given(text=st.text("ab<", max_size=20), stops=stop_lists, pieces=st.integers(1, 20))
def test_nothing_is_lost_while_no_stop_has_hit(text: str, stops: list[str], pieces: int) -> None:
    s = StopStrings(stops)
    fed = emitted = ""
    for i in range(pieces):
        piece = text[i::pieces]  # arbitrary pieces; the stream is their concatenation
        fed += piece
        out, hit = s.feed(piece)
        emitted += out
        if hit:
            return
        assert emitted + s.held == fed
        assert len(s.held) < max(map(len, stops))
