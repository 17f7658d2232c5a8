"""Stop strings: an Aho-Corasick automaton, fed generated text as it arrives.

Checking every stop string against the text on every token costs (number of stops x their
length) per token; the automaton costs amortised O(1) per character whatever the stops, so a
request with many stop strings cannot stall the caller. `StopAutomaton` is immutable and may be
shared by the generations of one request; each generation feeds its own `StopMatcher`.
"""

from __future__ import annotations

from collections import deque
from typing import Optional


class StopAutomaton:
    """A trie of the stop strings with failure links. State 0 is the root (the empty string)."""

    def __init__(self, stops: list[str]) -> None:
        self.goto: list[dict[str, int]] = [{}]
        self.depth = [0]  # length of the prefix that each state stands for
        ends = [self._insert(stop) for stop in stops]
        self.fail = [0] * len(self.goto)  # state of the longest proper suffix that is also a prefix
        # Length of the longest stop string that is a suffix of the state's prefix (0: none).
        self.match_len = [0] * len(self.goto)
        for end, stop in zip(ends, stops):
            self.match_len[end] = len(stop)
        self._link()

    def _insert(self, stop: str) -> int:
        state = 0
        for ch in stop:
            nxt = self.goto[state].get(ch)
            if nxt is None:
                nxt = self.goto[state][ch] = len(self.goto)
                self.goto.append({})
                self.depth.append(self.depth[state] + 1)
            state = nxt
        return state

    def _link(self) -> None:
        # Breadth first, so a state's failure target (shallower) is complete before the state.
        queue = deque(self.goto[0].values())
        while queue:
            state = queue.popleft()
            if not self.match_len[state]:
                self.match_len[state] = self.match_len[self.fail[state]]
            for ch, child in self.goto[state].items():
                self.fail[child] = self.step(self.fail[state], ch)
                queue.append(child)

    def step(self, state: int, ch: str) -> int:
        """The state after `ch`: the longest suffix of (state's prefix + ch) that is a prefix of a stop."""
        while state and ch not in self.goto[state]:
            state = self.fail[state]
        return self.goto[state].get(ch, 0)


class StopMatcher:
    """One generation's position in a StopAutomaton. Feed it the text as it grows."""

    def __init__(self, automaton: StopAutomaton) -> None:
        self.automaton = automaton
        self.state = 0
        self.fed = 0  # characters consumed so far
        self.match: Optional[int] = None

    def feed(self, text: str) -> Optional[int]:
        """Start index (in all text fed) of the stop string that ends first, the longest of those that end
        there; None if none has yet. After a match, further text is ignored and the match is returned."""
        if self.match is not None:
            return self.match
        automaton = self.automaton
        if len(automaton.goto) == 1:  # no stop strings: nothing to follow (this runs per token of every request)
            self.fed += len(text)
            return None
        for ch in text:
            self.state = automaton.step(self.state, ch)
            self.fed += 1
            length = automaton.match_len[self.state]
            if length:
                self.match = self.fed - length
                break
        return self.match

    @property
    def holdback(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string (0 after a match)."""
        return 0 if self.match is not None else self.automaton.depth[self.state]
