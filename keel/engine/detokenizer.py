"""Incremental detokenization: text deltas that never split a UTF-8 character.

Each step decodes a short window of recent tokens twice (with and without the new ones) and
emits the difference, unless the decoded text ends in U+FFFD, i.e. a multi-byte character whose
remaining bytes have not been generated yet; then the delta waits for the next token. A few
prompt tokens seed the window so tokenizers that treat a leading space specially decode the
first output token as they would mid-text.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = len(self.ids)  # tokens before this are already emitted

    def push(self, token_ids: list[int]) -> str:
        """Add tokens; return the text they complete (possibly empty)."""
        self.ids.extend(token_ids)
        prefix, full = self._window_texts()
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self._advance()
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """At the end of generation: whatever is pending, an incomplete character included."""
        prefix, full = self._window_texts()
        self._advance()
        return full[len(prefix):]

    def _window_texts(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        return prefix, decode(self.ids[self.prefix_offset:], skip_special_tokens=True)

    def _advance(self) -> None:
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
