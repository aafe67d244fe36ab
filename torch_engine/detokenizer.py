"""Incremental detokenization that never emits a broken UTF-8 sequence.

Decoding one token at a time breaks multi-byte characters split across byte-level tokens and
loses spacing that depends on neighbours; so each step decodes a short window (from prefix_offset)
and emits only the new, complete suffix.

At the end of a sequence (flush) the bytes of a character it cut short are not emitted: they would decode to
U+FFFD, a character the model never wrote (worker_runtime.text_end has the rule; the token ids keep the bytes).
So the pieces always add up to the sequence's final text, and a U+FFFD in it is one the model produced.
"""

from __future__ import annotations

from worker_runtime.text_end import trim_cut_character


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is still partial)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """At the end of a sequence: what is held back, less the bytes of a character the sequence cut short."""
        held = self._ids[self._read:]
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return trim_cut_character(after[len(before):], self._tok, held) if len(after) > len(before) else ""
