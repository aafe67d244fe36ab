"""Stop strings matched across token boundaries, with streamed text held back while it could
still turn into a stop string (a client must never see text that the final result drops)."""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._longest = max((len(s) for s in stops), default=0)
        self.text = ""
        self.sent = 0
        self.matched: str = ""

    def feed(self, piece: str) -> str:
        """Append decoded text; return what may be streamed now. Sets `matched` when a stop is hit."""
        if not self.stops:
            self.text += piece
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        start = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        hit, where = "", -1
        for s in self.stops:
            i = self.text.find(s, start)
            if i != -1 and (where == -1 or i < where):
                hit, where = s, i
        if hit:
            self.matched = hit
            self.text = self.text[:where]
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        safe = len(self.text) - self._held_back()
        out = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        for k in range(min(self._longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
