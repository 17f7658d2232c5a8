"""Tokenization for the API process: large inputs off the event loop, hopeless ones never tokenized.

Tokenizing or rendering a large prompt takes long and much memory (around 190 bytes per prompt
byte for a fast tokenizer), and on the event loop it would stall every other client. Inputs above
INLINE_CHARS go to one worker thread (one, since a tokenizer object is not safe to call from
several threads at once; fast tokenizers release the GIL while they work). Before that, a text
that cannot fit the context at all is refused from its length alone: no token covers more than
`max_token_chars` characters, so a text longer than context_length x that has too many tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, TypeVar

from transformers import PreTrainedTokenizerBase

INLINE_CHARS = 4096  # shorter inputs are tokenized on the event loop: a thread hop would cost more

T = TypeVar("T")


class TooLongForContext(ValueError):
    """A text that has more tokens than the context holds, known without tokenizing it."""


class Tokenization:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.max_token_chars = max(len(token) for token in tokenizer.get_vocab())
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keel-tokenizer")

    def check_fits(self, text: str, context_length: int) -> None:
        """Raise TooLongForContext if `text` surely has more than `context_length` tokens."""
        if len(text) > context_length * self.max_token_chars:
            raise TooLongForContext(f"a text of {len(text)} characters has more tokens than the context length "
                                    f"{context_length} (no token of this model covers more than "
                                    f"{self.max_token_chars} characters)")

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self.run(len(text), lambda: self.tokenizer(text, add_special_tokens=add_special_tokens)
                               .input_ids)

    async def decode(self, token_ids: list[int]) -> str:
        return await self.run(len(token_ids), lambda: self.tokenizer.decode(token_ids))

    async def render_chat(self, messages: list[dict[str, Any]], tools: Optional[list[dict]] = None,
                          template_kwargs: Optional[dict[str, Any]] = None, add_generation_prompt: bool = True) -> str:
        size = sum(len(m["content"] or "") for m in messages)
        return await self.run(size, lambda: self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False,
            **(template_kwargs or {})))

    async def run(self, size: int, work: Callable[[], T]) -> T:
        """`work()`, on the worker thread when `size` (characters or tokens) is large."""
        if size <= INLINE_CHARS:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._worker, work)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
