"""Reasoning output (`--reasoning-parser`): the `<think>...</think>` part of an answer goes to
`reasoning_content`, the rest to `content`, whole or streamed.

- `qwen3`: reasoning only between `<think>` and `</think>` (Qwen 3 writes `<think>` itself; with thinking off it
  writes none, and the whole answer is content).
- `deepseek-r1`: the chat template opens `<think>` in the prompt, so the answer starts inside the reasoning:
  everything up to `</think>` is reasoning (a leading `<think>` is dropped), all of it if the tag never comes.
"""

from __future__ import annotations

from keel.server.tool_calls import partial_suffix

PARSERS = ("qwen3", "deepseek-r1")
THINK_START, THINK_END = "<think>", "</think>"


def split_reasoning(parser: str, text: str) -> tuple[str, str]:
    """(reasoning, content) of a whole answer."""
    stream = StreamedReasoning(parser)
    reasoning, content = stream.feed(text)
    more_reasoning, more_content = stream.finish()
    return reasoning + more_reasoning, content + more_content


class StreamedReasoning:
    """feed() takes each text delta and returns (reasoning, content) surely decided so far; a tag split over
    deltas is held until it is complete; finish() returns what is held."""

    def __init__(self, parser: str) -> None:
        self._inside = parser == "deepseek-r1"  # R1's template opened the reasoning already
        self._at_start = True  # a <think> may still open (Qwen 3) or be repeated (R1)
        self._held = ""
        self._done = False  # </think> seen: the rest is content
        self._opening = False  # right after </think>: newlines are dropped until the content begins

    def feed(self, delta: str) -> tuple[str, str]:
        self._held += delta
        reasoning, content = [], []
        while self._held:
            if self._done:
                if not content and self._opening:  # the newlines after </think> separate, they are not content
                    self._held = self._held.lstrip("\n")
                    self._opening = not self._held
                content.append(self._held)
                self._held = ""
            elif self._at_start:
                start = self._held.lstrip()
                if THINK_START.startswith(start) and len(start) < len(THINK_START):
                    break  # blank, or the beginning of <think>
                self._at_start = False
                if start.startswith(THINK_START):
                    self._held, self._inside = start[len(THINK_START):], True
            elif self._inside:
                end = self._held.find(THINK_END)
                if end < 0:
                    keep = partial_suffix(self._held, THINK_END)
                    reasoning.append(self._held[:len(self._held) - keep])
                    self._held = self._held[len(self._held) - keep:]
                    break
                reasoning.append(self._held[:end])
                self._held, self._done, self._opening = self._held[end + len(THINK_END):], True, True
            else:
                self._done = True  # no reasoning opened: all content
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self._opening:
            held = held.lstrip("\n")
        return (held, "") if self._inside and not self._done else ("", held)
