"""Stop strings matched across token boundaries, with streamed text held back while it could
still turn into a stop string (a client must never see text that the final result drops).

A trailing run of U+FFFD is held back too: it may be the start of a character the sequence is about to cut
(worker_runtime.text_end), which the end of the sequence drops. So is one right before a matched stop string: the
text ends there, and bytes that did not make a whole character before it are not text (a detokenizer that held
back an unfinished character renders it as U+FFFD once the stop string's token follows). Text followed by
anything else is released as it is, U+FFFD included: the model wrote it mid-text.
"""

from __future__ import annotations

from collections.abc import Callable

from worker_runtime.text_end import REPLACEMENT, trailing_replacements


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._longest = max((len(s) for s in stops), default=0)
        self.text = ""
        self.sent = 0
        self.matched: str = ""

    def feed(self, piece: str) -> str:
        """Append decoded text; return what may be streamed now. Sets `matched` when a stop is hit."""
        start = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        hit, where = self._find(start)
        if hit:
            self.matched = hit
            self.text = self._before_stop(self.text[:where])
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def stopped_at(self, stop: str, text: str) -> str:
        """The engine itself cut the text at `stop` (`text` ends where the stop began): that text is final.
        Returns what is left to stream."""
        self.matched = stop
        self.text = self._before_stop(text)
        return self._release(len(self.text))

    def flush(self, end: Callable[[str], str] | None = None) -> str:
        """At the end of the sequence: what is held back. `end` (say text_end.trim_cut_character) gets the part
        not streamed yet, which holds any trailing U+FFFD, and returns what of it ends the text."""
        if end is not None:
            self.text = self.text[:self.sent] + end(self.text[self.sent:])
        return self._release(len(self.text))

    def _find(self, start: int) -> tuple[str, int]:
        hit, where = "", -1
        for s in self.stops:
            i = self.text.find(s, start)
            if i != -1 and (where == -1 or i < where):
                hit, where = s, i
        return hit, where

    def _before_stop(self, text: str) -> str:
        # Only what has not been streamed can be dropped; a held-back U+FFFD run never has been.
        if not text.endswith(REPLACEMENT):
            return text
        return text[:max(self.sent, len(text) - trailing_replacements(text))]

    def _release(self, upto: int) -> str:
        out = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out

    def _held_back(self) -> int:
        """Length of the tail kept back: the longest suffix that is a proper prefix of some stop string, and a
        run of U+FFFD right before it (counted without copying the text: this runs on every token)."""
        end = len(self.text) - self._stop_prefix()
        run = 0
        while run < end - self.sent and self.text[end - run - 1] == REPLACEMENT:
            run += 1
        return len(self.text) - end + run

    def _stop_prefix(self) -> int:
        for k in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
