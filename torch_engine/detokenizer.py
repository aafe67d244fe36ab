"""Incremental detokenization that never emits a broken UTF-8 sequence.

Decoding one token at a time breaks multi-byte characters split across byte-level tokens and
loses spacing that depends on neighbours; so each step decodes a short window (from prefix_offset)
and emits only the new, complete suffix.

At the end of a sequence (flush) the bytes of a character it cut short are not emitted: they would decode to
U+FFFD, a character the model never wrote (worker_runtime.text_end has the rule; the token ids keep the bytes).
So the pieces always add up to the sequence's final text, and a U+FFFD in it is one the model produced.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker_runtime.text_end import trailing_replacements, trim_cut_character

CONTEXT_TOKENS = 8     # of a continued sequence's end: enough for spacing and for a character cut across tokens


class IncrementalDetokenizer:
    def __init__(self, tokenizer, context: Sequence[int] = ()) -> None:
        """context: the end of the sequence this one continues (a kept sequence, continue/fork), so spacing
        carries on and a character that sequence cut short is completed here instead of shown as U+FFFD (its
        flush did not emit the cut bytes, so they count as not yet read)."""
        self._tok = tokenizer
        self._ids: list[int] = list(context[-CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)
        # U+FFFD ending the context stand for bytes its sequence cut short and did not emit: not yet said.
        self._unsaid = trailing_replacements(self._decode(self._ids)) if self._ids else 0

    def _said(self) -> str:
        """The text of the window that was already emitted."""
        before = self._decode(self._ids[self._prefix:self._read])
        return before[:len(before) - self._unsaid]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is still partial)."""
        self._ids.append(token_id)
        before = self._said()
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read, self._unsaid = self._read, len(self._ids), 0
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """At the end of a sequence: what is held back, less the bytes of a character the sequence cut short."""
        window = self._ids[self._prefix:]
        before = self._said()
        after = self._decode(window)
        self._prefix = self._read = len(self._ids)
        self._unsaid = 0
        return trim_cut_character(after[len(before):], self._tok, window) if len(after) > len(before) else ""
