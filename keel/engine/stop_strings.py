"""Stop strings: find the first match in generated text, and how much text to hold back while streaming."""

from __future__ import annotations

from typing import Optional


class StopStrings:
    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.longest = max((len(s) for s in stops), default=0)

    def find(self, text: str, new_from: int) -> Optional[int]:
        """Index where the earliest stop string begins, searching only matches that end at or after `new_from`."""
        start = max(0, new_from - self.longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits, default=None)

    def holdback(self, text: str) -> int:
        """Length of the longest suffix of `text` that could still grow into a stop string."""
        for length in range(min(self.longest - 1, len(text)), 0, -1):
            suffix = text[-length:]
            if any(s.startswith(suffix) for s in self.stops):
                return length
        return 0
