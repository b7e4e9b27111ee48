"""Incremental detokenization and stop strings, on the tiny model's byte-level BPE tokenizer."""

from __future__ import annotations

import random

import pytest

from vlora.engine.detokenizer import IncrementalDetokenizer, StopChecker, find_stop

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello 東京! Un café, s'il vous plaît. 🎉🚀 naïve 日本語 北京 👩‍👩‍👧",
    "emoji only: 🎉🎉🎉 — and a ∑ sign, Ω, 中文字符, ＡＢＣ.",
    "😀",
]


class CountingTokenizer:
    """Wraps the tokenizer to record how many ids each decode call sees (the O(1) claim)."""

    def __init__(self, tok):
        self.tok = tok
        self.max_ids = 0

    def decode(self, ids, **kw):
        self.max_ids = max(self.max_ids, len(ids))
        return self.tok.decode(ids, **kw)


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.push([t]) for t in ids]
    deltas.append(detok.flush())
    return deltas


def test_texts_really_split_characters(tokenizer):
    """Precondition: the multi-byte texts encode to tokens that cut characters in half."""
    ids = tokenizer.encode(TEXTS[1] + TEXTS[2])
    assert sum("\ufffd" in tokenizer.decode([t]) for t in ids) >= 5


@pytest.mark.parametrize("text", TEXTS)
def test_streaming_equals_full_decode_without_broken_chars(tokenizer, text):
    ids = tokenizer.encode(text)
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)
    deltas = stream(detok, ids)
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert full == text
    assert "".join(deltas) == full == detok.text
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # nothing left held back once the text is complete
    assert counting.max_ids <= 8  # a short window, never the whole sequence


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tokenizer, skip):
    ids = tokenizer.encode("<|im_start|>assistant\nBonjour 東京<|im_end|><|endoftext|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip)
    out = "".join(stream(detok, ids))
    assert out == tokenizer.decode(ids, skip_special_tokens=skip)
    assert ("<|im_end|>" in out) is not skip


def test_multi_token_pushes(tokenizer):
    ids = tokenizer.encode(TEXTS[1])
    detok = IncrementalDetokenizer(tokenizer)
    out = [detok.push(ids[i : i + 3]) for i in range(0, len(ids), 3)]
    assert "".join(out) == TEXTS[1] and detok.flush() == ""


def test_random_token_streams_match_full_decode(tokenizer):
    """Model output can be any id sequence, invalid UTF-8 included: streamed text still equals decode."""
    rng = random.Random(0)
    vocab = len(tokenizer)
    byte_ids = [t for t in range(vocab) if "\ufffd" in tokenizer.decode([t])]
    for _ in range(30):
        ids = [rng.choice(byte_ids) if rng.random() < 0.5 else rng.randrange(vocab) for _ in range(60)]
        detok = IncrementalDetokenizer(tokenizer)
        assert "".join(stream(detok, ids)) == tokenizer.decode(ids, skip_special_tokens=True)


# ---------------------------------------------------------------- stop strings


def run_stop(deltas: list[str], stop: list[str], include: bool = False):
    sc = StopChecker(stop, include)
    released, stopped = [], False
    for d in deltas:
        out, stopped = sc.push(d)
        released.append(out)
        if stopped:
            break
    if not stopped:
        released.append(sc.flush())
    return released, stopped


def test_stop_spanning_two_deltas_is_never_shown():
    released, stopped = run_stop(["Hello wo", "rld! More text"], ["world"])
    assert stopped and released == ["Hello ", ""]
    released, stopped = run_stop(["Hello wo", "rld! More text"], ["world"], include=True)
    assert stopped and released == ["Hello ", "world"]


def test_stop_spanning_many_deltas():
    released, stopped = run_stop(list("abc<|EN") + ["D|>tail"], ["<|END|>"])
    assert stopped and "".join(released) == "abc"
    assert released[:3] == ["a", "b", "c"]  # only a possible stop prefix is held back, not max_len-1 chars


def test_held_back_text_released_at_end():
    released, stopped = run_stop(["abcx", "y"], ["xyz"])
    assert not stopped and released == ["abc", "", "xy"]


def test_false_prefix_released_when_it_cannot_become_stop():
    released, stopped = run_stop(["end wi", "th no stop"], ["with stop"])
    assert not stopped and "".join(released) == "end with no stop"
    assert released[0] == "end " and released[1] == "with no stop"


def test_earliest_stop_wins():
    assert find_stop("a STOP b END", ["END", "STOP"]) == (2, "STOP")
    assert find_stop("xxAB", ["AB", "A"]) == (2, "AB")  # tie on start: the one listed first
    released, stopped = run_stop(["one two three"], ["three", "two"], include=True)
    assert stopped and released == ["one two"]


def test_no_stop_strings_passes_through():
    released, stopped = run_stop(["a", "b"], [])
    assert released == ["a", "b", ""] and not stopped


@pytest.mark.parametrize("include", [False, True])
def test_detokenizer_with_stop_token_by_token(tokenizer, include):
    text = "Un café à 東京, then the lazy dog sleeps."
    ids = tokenizer.encode(text)
    detok, sc = IncrementalDetokenizer(tokenizer), StopChecker(["lazy dog", "東京!"], include)
    shown = ""
    for t in ids:
        out, stopped = sc.push(detok.push([t]))
        shown += out
        if stopped:
            break
    assert stopped
    expected = "Un café à 東京, then the " + ("lazy dog" if include else "")
    assert shown == expected
