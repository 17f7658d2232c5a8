"""RequestState: the front end's view of one request: detokenized text, stop strings, log-probs.

Token-level stops (EOS, stop_token_ids, max_new_tokens) are decided by the scheduler; stop
strings need text, so they are found here, and the front end then finishes the request in the
core. The text never contains a stop string, and streamed deltas hold back any tail that could
still become one.

Text is made as it is needed: on every step for a stream or a request with stop strings, else once when the
request finishes. The offline engine detokenizes on the thread that launches the steps: at batch 256 the two
window decodes per request and token were half of its host time per step outside the forward (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Optional

from transformers import PreTrainedTokenizerBase

from keel.engine.detokenizer import IncrementalDetokenizer, TextDecoder
from keel.engine.outputs import CoreOutput, RequestOutput
from keel.engine.stop_strings import StopAutomaton, StopMatcher
from keel.sampling_params import SamplingParams


class RequestState:
    def __init__(self, request_id: str, prompt: Optional[str], prompt_ids: list[int], params: SamplingParams,
                 tokenizer: PreTrainedTokenizerBase, stop_automaton: Optional[StopAutomaton] = None,
                 incremental_text: bool = True) -> None:
        """`stop_automaton`: params.stop's automaton, built once and shared when a request has several choices.
        `incremental_text`: take_delta is called while the request runs (else the text is read once it finished)."""
        self.output = RequestOutput(request_id, prompt, list(prompt_ids),
                                    logprobs=[] if params.wants_logprobs else None)
        self.detokenizer = IncrementalDetokenizer(TextDecoder(tokenizer), prompt_ids)
        self.stops = StopMatcher(stop_automaton or StopAutomaton(params.stop))
        self.streamed = 0  # characters of output.text already handed out by take_delta
        self.text_each_step = incremental_text or bool(params.stop)
        self.detokenized = 0  # output tokens given to the detokenizer

    def update(self, out: CoreOutput) -> bool:
        """Apply one step's tokens. True if a stop string just ended the request (the core must finish it)."""
        result = self.output
        if out.num_cached_tokens is not None:
            result.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            result.prompt_logprobs = out.prompt_logprobs
        result.error = out.error
        if out.num_draft_tokens:
            result.spec_verify_ct += 1
            result.spec_draft_tokens += out.num_draft_tokens
            result.spec_accepted_tokens += out.num_accepted_tokens
        result.token_ids.extend(out.token_ids)
        if result.logprobs is not None and out.logprobs:
            result.logprobs.extend(out.logprobs)
        if not self.text_each_step and out.finish_reason is None:
            return False
        text = self.detokenizer.push(result.token_ids[self.detokenized:])
        self.detokenized = len(result.token_ids)
        if out.finish_reason is not None:
            text += self.detokenizer.flush()
        result.text += text
        hit = self.stops.feed(text)  # an index into all text fed, which is result.text before any cut
        if hit is not None:
            result.text = result.text[:hit]
            result.finish_reason = "stop"
            return out.finish_reason is None
        result.finish_reason = out.finish_reason
        return False

    def take_delta(self) -> str:
        """New text that is safe to show: all of it once finished, else all but a possible stop-string start."""
        text = self.output.text
        end = len(text) if self.output.finished else len(text) - self.stops.holdback
        delta = text[self.streamed:end]
        self.streamed = max(self.streamed, end)
        return delta
