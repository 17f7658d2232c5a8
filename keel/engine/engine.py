"""Engine: keel's offline Python API.

    engine = keel.Engine("keel-demo", page_size=16)
    outputs = engine.generate(["Hello", "The sky is"], keel.SamplingParams(max_new_tokens=32))
    for delta in engine.stream("Once upon a time"): print(delta, end="")

Options are EngineConfig's fields (the CLI flags with underscores). Requests from all calls
share one continuous batch; a request joins between steps and leaves when it finishes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Optional, Union

from tqdm import tqdm

from keel.config import EngineConfig
from keel.engine.core import EngineCore
from keel.engine.outputs import RequestOutput
from keel.engine.request_state import RequestState
from keel.models.tokenizer import load_tokenizer
from keel.sampling_params import SamplingParams

Prompt = Union[str, list[int]]


class Engine:
    def __init__(self, model: str = "keel-demo", **options: object) -> None:
        self.config = EngineConfig.from_options(model, **options)
        self.core = EngineCore(self.config)
        self.tokenizer = load_tokenizer(self.core.source)  # text is the front end's: the core sees token ids
        self._states: dict[int, RequestState] = {}

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 progress: bool = False) -> list[RequestOutput]:
        """One output per prompt, in order. Every request is checked before any of them starts.
        `progress` shows a progress bar of finished requests."""
        items = self._prompts(prompts)
        params = self._params(sampling_params, len(items))
        for (_, ids), p in zip(items, params):
            self.core.validate(ids, p)
        rids = [self._add(text, ids, p, incremental_text=False) for (text, ids), p in zip(items, params)]
        unfinished = set(rids)
        with tqdm(total=len(rids), desc="Requests", unit="req", disable=not progress) as bar:
            while unfinished:
                finished = unfinished.intersection(self._step())
                unfinished -= finished
                bar.update(len(finished))
        return [self._states.pop(rid).output for rid in rids]

    def stream(self, prompt: Prompt, sampling_params: Optional[SamplingParams] = None) -> Iterator[str]:
        """Text deltas of one request as they are generated. Closing the iterator early aborts the request."""
        (text, ids), = self._prompts(prompt)
        params = sampling_params or SamplingParams()
        self.core.validate(ids, params)
        rid = self._add(text, ids, params)
        state = self._states[rid]
        try:
            while not state.output.finished:
                self._step()
                delta = state.take_delta()
                if delta:
                    yield delta
            delta = state.take_delta()
            if delta:
                yield delta
        finally:
            if not state.output.finished:
                self.core.abort(rid)
            self._states.pop(rid, None)

    def _add(self, text: Optional[str], ids: list[int], params: SamplingParams, incremental_text: bool = True) -> int:
        rid = self.core.add_request(ids, params)
        self._states[rid] = RequestState(str(rid), text, ids, params, self.tokenizer, incremental_text=incremental_text)
        return rid

    def _step(self) -> list[int]:
        """One engine step; returns the requests it finished."""
        if not self.core.has_work:  # a request this front end waits for vanished from the core: fail, never hang
            raise RuntimeError("the engine core has no requests left, but some outputs are unfinished")
        finished = []
        for out in self.core.step():
            state = self._states.get(out.rid)
            if state is None:
                continue
            if state.update(out):
                self.core.abort(out.rid, reason="stop")
            if state.output.finished:
                finished.append(out.rid)
        return finished

    def _prompts(self, prompts: Union[Prompt, Sequence[Prompt]]) -> list[tuple[Optional[str], list[int]]]:
        """Normalise to [(text or None, token ids)]: a string, a list of token ids, or a list of either."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        items = []
        for prompt in prompts:
            if isinstance(prompt, str):
                items.append((prompt, self.tokenizer(prompt).input_ids))
            elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
                items.append((None, list(prompt)))
            else:
                raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        return items

    @staticmethod
    def _params(params: Union[SamplingParams, Sequence[SamplingParams], None], n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling_params for {n} prompts")
        return params
