"""Streaming detokenization and stop strings: text deltas a client can show and never has to retract.

Byte-level BPE tokens can end in the middle of a UTF-8 character (emoji, CJK), so a delta is
only emitted once the decoded tail is complete. Decoding uses vLLM's prefix/read offsets: each
step decodes only the few tokens since the last emitted boundary, so the cost per token is O(1).
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"
# A UTF-8 character spans at most 4 bytes, so this many held tokens still ending in U+FFFD means
# the model emitted genuinely invalid bytes: emit them rather than let the window (and cost) grow.
MAX_HELD_TOKENS = 32


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas for one sequence.

    Invariant: `_prefix:_read` are the tokens whose text was last emitted (a window ending on a
    character boundary, kept only as decoding context); `_read:` are tokens not yet emitted.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # A `tokenizers`-backed tokenizer decodes through its Rust backend directly: the same text as
        # `tokenizer.decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`
        # without that wrapper's per-call argument conversion, which cost more than the decode.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend_decode = getattr(backend, "decode", None)
        self.token_ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend_decode is not None:
            return self._backend_decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def push(self, token_ids: list[int]) -> str:
        """Append tokens; return the newly completed text (possibly "")."""
        self.token_ids.extend(token_ids)
        return self._advance(force=len(self.token_ids) - self._read >= MAX_HELD_TOKENS)

    def flush(self) -> str:
        """At the end of the sequence: release held-back text even if it ends with U+FFFD."""
        return self._advance(force=True)

    def _advance(self, force: bool) -> str:
        prefix_text = self._decode(self.token_ids[self._prefix : self._read])
        new_text = self._decode(self.token_ids[self._prefix :])
        if new_text.endswith(REPLACEMENT_CHAR) and not force:
            return ""  # an incomplete UTF-8 sequence at the tail: wait for the next token(s)
        delta = new_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self.token_ids)
        self.text += delta
        return delta


def find_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """Earliest (start index, stop string) in `text`; ties go to the stop listed first."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def _held_suffix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class StopChecker:
    """Applies stop strings to a stream of text deltas.

    Holds back the trailing characters that could still grow into a stop string (at most
    max(len(stop)) - 1), so a match that straddles deltas is caught before any of it is sent.
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool = False):
        self.stops = list(stop)
        self.include = include_stop_str_in_output
        self.pending = ""  # seen but not yet released
        self.stopped: str | None = None  # the stop string that ended the sequence

    def push(self, delta: str, check: bool = True) -> tuple[str, bool]:
        """Feed new text; return (text safe to release now, whether a stop string matched).
        With `check` False (below min_tokens) everything is released unchecked."""
        if self.stopped is not None:
            return "", True
        buf = self.pending + delta
        if not self.stops or not check:
            self.pending = ""
            return buf, False
        hit = find_stop(buf, self.stops)
        if hit is not None:
            i, s = hit
            self.stopped, self.pending = s, ""
            return buf[: i + len(s)] if self.include else buf[:i], True
        keep = _held_suffix_len(buf, self.stops)
        self.pending = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The sequence ended for another reason (EOS, length): release what was held back."""
        out, self.pending = self.pending, ""
        return out
