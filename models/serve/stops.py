"""Text of a generated sequence, streamed without ever showing a stop string.

Why held back: a stop string can span token boundaries ("\n\nUser" may arrive as "\n", "\nUs",
"er"). Text is released only up to the last position where no stop string could still begin;
when one completes, everything before it is released and the rest is dropped."""
from __future__ import annotations

from typing import Sequence


class StopText:
    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.text = ""          # everything decoded so far
        self.sent = 0           # characters of `text` already released
        self.stopped = False

    def _holdback(self) -> int:
        """Characters at the end of `text` that could be the start of a stop string."""
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:n]):
                    hold = n
                    break
        return hold

    def add(self, piece: str) -> str:
        """Append decoded text; return what may be shown now."""
        if self.stopped:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0) + 1)
        self.text += piece
        if self.stops:
            hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if hits:
                cut = min(hits)
                self.stopped = True
                self.text = self.text[:cut]
                return self._release(len(self.text))
        return self._release(len(self.text) - self._holdback())

    def finish(self) -> str:
        """End of generation: release what was held back."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        upto = max(upto, self.sent)
        out = self.text[self.sent:upto]
        self.sent = upto
        return out

    @property
    def shown(self) -> str:
        return self.text[:self.sent]

