"""Structured output: a request's grammar (a JSON schema, a regular expression, an EBNF grammar, or a structural
tag, which tool calls use), compiled by xgrammar against the tokenizer, one matcher per request, and the token
bitmask that keeps each next token inside its grammar.

The front end checks a grammar's syntax (check_grammar: no tokenizer needed, so a bad one is a 400 before the
engine sees it); the engine compiles it (Grammars, cached per grammar) and keeps a matcher on the request. Each
step that samples for such a request fills the bitmask on the host after the forward is queued, so the GPU runs
the forward meanwhile, and applies it to the logits on the device before sampling. xgrammar is imported on first
use: a server without grammar requests never pays its import (nor does the front end's flag parsing pay
torch's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional

if TYPE_CHECKING:
    import torch

GrammarKind = Literal["json_schema", "regex", "ebnf", "structural_tag"]
# xgrammar's errors start with a timestamp and the C++ source line: "[20:22:45] /project/cpp/x.cc:94: why"
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")
# Whitespace between JSON tokens is free, but at most this many characters in a row: a model that keeps choosing
# whitespace (a known failure of free-whitespace JSON grammars) cannot run to max_tokens; pretty-printed JSON
# nested ten deep still fits.
MAX_JSON_WHITESPACE = 24


@dataclass(frozen=True)
class GrammarSpec:
    kind: GrammarKind
    source: str  # the JSON schema (JSON text), the regular expression, the EBNF grammar or the structural tag (JSON)


class InvalidGrammar(ValueError):
    """The grammar does not parse; the message is xgrammar's, without its source location."""


def check_grammar(spec: GrammarSpec) -> None:
    """Parse `spec` (not compile it: that needs the tokenizer); raise InvalidGrammar saying what is wrong."""
    import xgrammar as xgr

    build = {"json_schema": xgr.Grammar.from_json_schema, "regex": xgr.Grammar.from_regex,
             "ebnf": xgr.Grammar.from_ebnf, "structural_tag": xgr.Grammar.from_structural_tag}[spec.kind]
    try:
        build(spec.source)
    except Exception as e:  # xgrammar raises RuntimeError (and a few others) with its parser's message
        raise _invalid(spec, e) from e


class Grammars:
    """The engine's grammar compiler for one tokenizer and vocabulary: compiled grammars are cached, so every
    request with the same schema shares one."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...],
                 json_whitespace: bool = True) -> None:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=list(stop_token_ids) or None)
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=True)
        self.json_whitespace = json_whitespace

    def matcher(self, spec: GrammarSpec) -> Any:
        """A fresh xgrammar GrammarMatcher for one request."""
        import xgrammar as xgr

        try:
            if spec.kind == "json_schema":
                compiled = self._compiler.compile_json_schema(
                    spec.source, any_whitespace=self.json_whitespace,
                    max_whitespace_cnt=MAX_JSON_WHITESPACE if self.json_whitespace else None)
            elif spec.kind == "regex":
                compiled = self._compiler.compile_regex(spec.source)
            elif spec.kind == "structural_tag":
                compiled = self._compiler.compile_structural_tag(spec.source)
            else:
                compiled = self._compiler.compile_grammar(spec.source)
        except Exception as e:
            raise _invalid(spec, e) from e
        return xgr.GrammarMatcher(compiled)


def _invalid(spec: GrammarSpec, error: Exception) -> InvalidGrammar:
    """xgrammar's message, its first line without the source location."""
    return InvalidGrammar(f"invalid {spec.kind}: {_LOCATION.sub('', str(error).strip()).splitlines()[0]}")


def fill_bitmask(matchers: list[Optional[Any]], vocab_size: int) -> Optional[torch.Tensor]:
    """The allowed next tokens of each row (an xgrammar bitmask, int32 [rows, words], on the host), or None when
    no row has a grammar. Rows without one allow every token."""
    if all(m is None for m in matchers):
        return None
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
    for row, matcher in enumerate(matchers):
        if matcher is not None:
            matcher.fill_next_token_bitmask(bitmask, row)
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the logits of the tokens `bitmask` forbids to -inf, in place, on the logits' device."""
    import xgrammar as xgr

    if logits.device.type == "cuda":
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[-1])
