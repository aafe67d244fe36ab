"""Incremental detokenization and stop strings across token boundaries."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from torch_engine.detokenizer import IncrementalDetokenizer
from worker_runtime.stop_strings import StopStringMatcher


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.mark.parametrize("text", ["héllo wörld, naïve café", "日本語のテキスト 🙂🚀", "plain ascii 12 + 7 = 19"])
def test_streamed_pieces_are_valid_and_add_up(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(t) for t in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)
    if any(ord(c) > 0x7FF for c in text):
        assert "" in pieces[:-1], "multi-byte characters split over tokens must be held back"


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> str:
    out = ""
    for p in pieces:
        out += matcher.feed(p)
        if matcher.matched:
            return out
    return out + matcher.flush()


def test_stop_string_across_pieces_is_cut_and_never_streamed():
    m = StopStringMatcher(("STOP",))
    streamed = []
    for p in ["abc S", "T", "OP tail"]:
        streamed.append(m.feed(p))
        if m.matched:
            break
    assert m.matched == "STOP"
    assert m.text == "abc "
    assert "".join(streamed) == "abc "
    assert streamed[0] == "abc ", "a possible stop prefix is held back"


def test_false_start_is_released():
    m = StopStringMatcher(("</answer>",))
    assert feed_all(m, ["x </ans", "wer is near", " end"]) == "x </answer is near end"
    assert m.matched == ""


def test_earliest_of_several_stops_wins():
    m = StopStringMatcher(("world", "lo w"))
    feed_all(m, ["hel", "lo world"])
    assert m.matched == "lo w" and m.text == "hel"


def test_no_stops_passes_through():
    m = StopStringMatcher(())
    assert [m.feed("a"), m.feed("b")] == ["a", "b"]
