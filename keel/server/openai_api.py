"""The OpenAI routes: /v1/completions and /v1/chat/completions, streaming or not."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import reprlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Optional, Union

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from transformers import PreTrainedTokenizerBase

from keel.config import ServerConfig
from keel.engine.limits import ContextLengthError, validate_request
from keel.engine.outputs import RequestOutput, TokenLogprob, mean_accept_length
from keel.engine.stop_strings import StopAutomaton
from keel.sampling_params import InvalidParameter, SamplingParams
from keel.server.disagg import RemotePrefill, prefill_url
from keel.server.engine_client import EngineClient
from keel.server.errors import APIError
from keel.server.generation import Generation, merged_events
from keel.server.metrics import ServerMetrics
from keel.server.chat_answer import AnswerFormat, StreamedAnswer, answer_message
from keel.server.protocol import (ChatCompletionRequest, ChatMessage, CompletionRequest, NamedToolChoice,
                                 DetokenizeRequest, ResponseFormat, StreamOptions, TokenizeRequest,
                                 UnsupportedContent)
from keel.server.tokenization import Tokenization, TooLongForContext
from keel.server.tool_calls import tool_grammar

logger = logging.getLogger(__name__)

MAX_N = 128
MAX_COMPLETION_LOGPROBS = 5
# keel's name for a sampling parameter -> the request field a client sets
_COMPLETION_FIELDS = {"max_new_tokens": "max_tokens", "top_logprobs": "logprobs", "prompt_logprobs": "logprobs",
                      "json_schema": "response_format"}
_CHAT_FIELDS = {"max_new_tokens": "max_completion_tokens", "json_schema": "response_format",
                "structural_tag": "tool_choice"}
# what {"type": "json_object"} promises: a JSON object, any keys
JSON_OBJECT_SCHEMA = '{"type": "object"}'


RETRY_AFTER_S = 1  # told to clients refused because the queue is full


@dataclass(frozen=True)
class ServerContext:
    client: EngineClient
    tokenizer: PreTrainedTokenizerBase
    tokenization: Tokenization
    metrics: ServerMetrics
    model_name: str
    config: ServerConfig
    remote: Optional[RemotePrefill] = None  # a decode server's link to the prefill servers

    @property
    def max_pending(self) -> int:
        """Most engine requests in flight: a full batch plus the allowed queue."""
        return self.client.config.max_running_requests + self.config.max_queued_requests


@dataclass(frozen=True)
class Prompt:
    text: Optional[str]
    ids: list[int]


# ---- shared ------------------------------------------------------------------------------------


def check_model(ctx: ServerContext, model: str) -> None:
    if model != ctx.model_name:
        raise APIError(404, f"The model {reprlib.repr(model)} does not exist; this server serves `{ctx.model_name}`.",
                       param="model", code="model_not_found")


def sampling_params(fields: dict[str, Any], names: dict[str, str]) -> SamplingParams:
    try:
        return SamplingParams(**fields)
    except InvalidParameter as e:
        raise APIError(400, str(e).replace(e.param, names.get(e.param, e.param), 1),
                       param=names.get(e.param, e.param)) from e


def check_request(ctx: ServerContext, prompt: Prompt, params: SamplingParams, param: str) -> None:
    assert ctx.client.limits is not None
    try:
        validate_request(prompt.ids, params, ctx.client.limits)
    except ContextLengthError as e:
        raise APIError(400, str(e), param=param, code="context_length_exceeded") from e
    except InvalidParameter as e:
        raise APIError(400, str(e), param=e.param) from e
    except ValueError as e:
        raise APIError(400, str(e), param=param) from e


async def encode_prompt(ctx: ServerContext, text: str, param: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of a prompt text; one that cannot fit the context is refused before it is tokenized."""
    assert ctx.client.limits is not None
    try:
        ctx.tokenization.check_fits(text, ctx.client.limits.context_length)
    except TooLongForContext as e:
        raise APIError(400, str(e), param=param, code="context_length_exceeded") from e
    return await ctx.tokenization.encode(text, add_special_tokens)


def check_capacity(ctx: ServerContext, num_prompts: int, n: int) -> None:
    """Bound the work one request can start (prompts x n), and refuse with 503 while the queue is full."""
    fanout = num_prompts * n
    if fanout > ctx.config.max_fanout:
        raise APIError(400, f"{num_prompts} prompts x n={n} = {fanout} generations, more than the "
                            f"{ctx.config.max_fanout} one request may start (--max-fanout)", param="n")
    if not ctx.client.has_room(fanout, ctx.max_pending):
        raise APIError(503, f"the server is at capacity ({ctx.max_pending} requests in flight); retry shortly",
                       type="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


def common_fields(body: Union[CompletionRequest, ChatCompletionRequest]) -> dict[str, Any]:
    if not 1 <= body.n <= MAX_N:
        raise APIError(400, f"n must be between 1 and {MAX_N}, got {body.n}", param="n")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    return dict(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k,
        min_p=body.min_p or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        stop=body.stop,
        ignore_eos=body.ignore_eos,
        json_schema=json_schema(body.response_format),
        regex=body.regex,
        ebnf=body.ebnf,
    )


def json_schema(response_format: Optional[ResponseFormat]) -> Optional[str]:
    """The JSON schema a response_format asks for (as JSON text), or None for plain text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return JSON_OBJECT_SCHEMA
    if response_format.json_schema is None or response_format.json_schema.schema_ is None:
        raise APIError(400, "response_format of type json_schema needs json_schema.schema",
                       param="response_format")
    return json.dumps(response_format.json_schema.schema_)


async def make_generations(ctx: ServerContext, request_id: str, prompts: list[Prompt],
                           prompt_params: list[SamplingParams], n: int, request: Request,
                           streamed: bool) -> list[Generation]:
    """n choices per prompt, numbered prompt by prompt; with a seed, choice j draws from seed + j, so the
    choices differ but repeat. Every choice shares one stop-string automaton (the stops are the request's).
    On a decode server, each is prefilled on the prefill server the router named. Unless `streamed`, their text
    is made once they end (RequestState)."""
    url = prefill_url(ctx.client, request)
    submit = None
    if url is not None:
        assert ctx.remote is not None
        submit = functools.partial(ctx.remote.submit, url=url)
    stop = prompt_params[0].stop
    stops = await ctx.tokenization.run(sum(map(len, stop)), lambda: StopAutomaton(stop))
    generations = []
    for p, (prompt, params) in enumerate(zip(prompts, prompt_params)):
        for j in range(n):
            choice_params = params if params.seed is None or j == 0 else _with_seed(params, (params.seed + j) % 2**64)
            generations.append(Generation(request_id, p * n + j, ctx.client, ctx.metrics, ctx.tokenizer,
                                          prompt.text, prompt.ids, choice_params, stops, submit, streamed))
    return generations


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    return SamplingParams(**{**params.__dict__, "seed": seed})


async def collect(generations: list[Generation], request: Request) -> Optional[list[RequestOutput]]:
    """Run every generation to the end, or, the moment the client disconnects (even while its requests still
    wait in the queue), abort them all at once and return None. (Streams need no such watch: Starlette
    cancels a stream whose client is gone, which aborts its generations.)"""
    run = asyncio.ensure_future(_run_to_end(generations))
    gone = asyncio.ensure_future(_disconnected(request))
    await asyncio.wait({run, gone}, return_when=asyncio.FIRST_COMPLETED)
    disconnected = gone.done()  # also when the run ended in the same instant: its requests were aborted
    gone.cancel()
    if disconnected or not run.done():
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
        logger.info("client of %s disconnected: its %d requests are aborted", generations[0].request_id,
                    len(generations))
        return None
    outputs = run.result()
    for out in outputs:
        if out.error is not None:
            raise APIError(500, f"the engine could not serve the request: {out.error}", type="internal_error")
    return outputs


async def _run_to_end(generations: list[Generation]) -> list[RequestOutput]:
    """Each generation's whole output, once all have ended (read from the generation itself: one that ended
    without a last event, as an aborted one does, has an output too)."""
    async for _ in merged_events(generations):
        pass
    return [g.state.output for g in generations]


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so nothing else arrives before that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def client_gone() -> Response:
    """The response to a client that has disconnected: nobody will read it."""
    return Response(status_code=499)


def usage(prompts: list[Prompt], outputs: list[RequestOutput]) -> dict[str, Any]:
    """Token counts; cached_tokens: prompt tokens whose KV came from the prefix cache (the prompts' first
    choices: each prompt counts once, as in prompt_tokens)."""
    prompt_tokens = sum(len(p.ids) for p in prompts)
    completion_tokens = sum(len(o.token_ids) for o in outputs)
    n = max(len(outputs) // max(len(prompts), 1), 1)
    cached = sum(o.num_cached_tokens for o in outputs[::n])
    result: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens,
                              "prompt_tokens_details": {"cached_tokens": cached}}
    accept_length = mean_accept_length(outputs)
    if accept_length is not None:  # an extension, as vLLM and SGLang add theirs: speculative decoding's acceptance
        result["speculative"] = {"verify_steps": sum(o.spec_verify_ct for o in outputs),
                                 "draft_tokens": sum(o.spec_draft_tokens for o in outputs),
                                 "accepted_tokens": sum(o.spec_accepted_tokens for o in outputs),
                                 "accept_length": accept_length}
    return result


class StreamUsage:
    """The usage a stream reports: with include_usage, a last chunk of totals (and `"usage": null` in the
    others); with continuous_usage_stats too (vLLM's), the counts so far in every chunk."""

    def __init__(self, options: Optional[StreamOptions], prompts: list[Prompt]) -> None:
        self.final = bool(options and options.include_usage)
        self.continuous = self.final and bool(options and options.continuous_usage_stats)
        self.prompt_tokens = sum(len(p.ids) for p in prompts)
        self.completion_tokens = 0

    def add(self, token_ids: list[int]) -> None:
        self.completion_tokens += len(token_ids)

    def field(self) -> dict[str, Any]:
        if not self.continuous:
            return {"usage": None} if self.final else {}
        return {"usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                          "total_tokens": self.prompt_tokens + self.completion_tokens}}


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def sse_stream(events: AsyncIterator[str], response_id: str) -> StreamingResponse:
    return StreamingResponse(_note_disconnect(events, response_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _note_disconnect(events: AsyncIterator[str], response_id: str) -> AsyncIterator[str]:
    """Log one line when a stream is cut off before its last event (its client went away)."""
    try:
        async for event in events:
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        logger.info("client of %s disconnected: its requests are aborted", response_id)
        raise


def token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    return tokenizer.decode([token_id])


# ---- /v1/completions ----------------------------------------------------------------------------


async def create_completion(ctx: ServerContext, body: CompletionRequest, request: Request):
    check_model(ctx, body.model)
    items = prompt_items(body.prompt)
    check_capacity(ctx, len(items), body.n)  # before tokenizing: a refused request costs nothing
    prompts = await completion_prompts(ctx, items)
    if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise APIError(400, f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS}", param="logprobs")
    if body.best_of not in (None, 1) and body.best_of != body.n:
        raise APIError(400, "best_of other than 1 (or n) is not supported", param="best_of")
    score_only = body.max_tokens == 0  # the prompt alone (with echo and logprobs: its log-probs), as vLLM
    if score_only and body.stream:
        raise APIError(400, "max_tokens 0 (score the prompt) is answered whole, not streamed", param="max_tokens")
    fields = common_fields(body)
    fields.update(seed=body.seed, logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0,
                  prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None)
    checked = []
    for prompt in prompts:
        room = ctx.client.limits.context_length - len(prompt.ids)
        max_tokens = 1 if score_only else body.max_tokens if body.max_tokens is not None else max(room, 1)
        params = sampling_params({**fields, "max_new_tokens": max_tokens}, _COMPLETION_FIELDS)
        check_request(ctx, prompt, params, "prompt")
        checked.append(params)
    response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echoes = [await prompt_text(ctx, p) for p in prompts] if body.echo else None
    generations = await make_generations(ctx, response_id, prompts, checked, body.n, request, body.stream)
    if body.stream:
        return sse_stream(stream_completion(ctx, body, prompts, echoes, generations, response_id, created),
                          response_id)
    outputs = await collect(generations, request)
    if outputs is None:
        return client_gone()
    if score_only:  # the one token generated to run the forward is not part of the answer
        outputs = [dataclasses.replace(o, text="", token_ids=[], logprobs=[] if o.logprobs is not None else None,
                                       finish_reason="length") for o in outputs]
    size = sum(len(p.ids) for p in prompts) if body.echo else sum(len(o.token_ids) for o in outputs)
    choices = await ctx.tokenization.run(size, lambda: [
        completion_choice(ctx, body, prompts[i // body.n], echoes[i // body.n] if echoes else None, i, out)
        for i, out in enumerate(outputs)])
    return JSONResponse({"id": response_id, "object": "text_completion", "created": created,
                         "model": ctx.model_name, "choices": choices, "usage": usage(prompts, outputs)})


def prompt_items(prompt: Union[str, list[str], list[int], list[list[int]]]) -> list[Union[str, list[int]]]:
    """The prompts of a completion request: one text or token-id list, or a list of them."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]  # type: ignore[list-item]
    return prompt  # type: ignore[return-value]


async def completion_prompts(ctx: ServerContext, items: list[Union[str, list[int]]]) -> list[Prompt]:
    if not items:
        raise APIError(400, "prompt is empty", param="prompt")
    result = []
    for item in items:
        if not item:
            raise APIError(400, "prompt is empty", param="prompt")
        if isinstance(item, str):
            result.append(Prompt(item, await encode_prompt(ctx, item, "prompt")))
        else:
            result.append(Prompt(None, list(item)))
    return result


async def prompt_text(ctx: ServerContext, prompt: Prompt) -> str:
    return prompt.text if prompt.text is not None else await ctx.tokenization.decode(prompt.ids)


def completion_choice(ctx: ServerContext, body: CompletionRequest, prompt: Prompt, echo: Optional[str], index: int,
                      out: RequestOutput) -> dict[str, Any]:
    text = out.text if echo is None else echo + out.text
    logprobs = None
    if body.logprobs is not None:
        entries = out.logprobs or []
        if echo is not None:
            echoed = [None, *(out.prompt_logprobs or [])]
            logprobs = completion_logprobs(ctx, prompt.ids, echoed, 0)
            tail = completion_logprobs(ctx, out.token_ids, entries, len(echo))
            logprobs = {key: logprobs[key] + tail[key] for key in logprobs}
        else:
            logprobs = completion_logprobs(ctx, out.token_ids, entries, 0)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}


def completion_logprobs(ctx: ServerContext, token_ids: list[int], entries: list[Optional[TokenLogprob]],
                        offset: int) -> dict[str, list]:
    """The legacy completions format: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token_id, entry in zip(token_ids, entries):
        text = token_text(ctx.tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        token_logprobs.append(entry.logprob if entry is not None else None)
        top.append({token_text(ctx.tokenizer, t): lp for t, lp in with_chosen(token_id, entry)}
                   if entry is not None else None)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


async def stream_completion(ctx: ServerContext, body: CompletionRequest, prompts: list[Prompt],
                            echoes: Optional[list[str]], generations: list[Generation], response_id: str,
                            created: int) -> AsyncIterator[str]:
    tracked = StreamUsage(body.stream_options, prompts)
    header = {"id": response_id, "object": "text_completion", "created": created, "model": ctx.model_name}
    started: set[int] = set()
    offsets: dict[int, int] = {}
    finished: dict[int, RequestOutput] = {}
    async for event in merged_events(generations):
        text = event.text
        if echoes is not None and event.index not in started:
            text = echoes[event.index // body.n] + text
        started.add(event.index)
        if event.error is not None:
            yield sse({"error": APIError(500, event.error, type="internal_error").body()["error"]})
            continue
        tracked.add(event.token_ids)
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(ctx, event.token_ids, event.logprobs, offsets.get(event.index, 0))
            offsets[event.index] = offsets.get(event.index, 0) + sum(len(t) for t in logprobs["tokens"])
        if text or event.finished or logprobs or (tracked.continuous and event.token_ids):  # counted tokens go out
            choice = {"index": event.index, "text": text, "logprobs": logprobs, "finish_reason": event.finish_reason}
            yield sse({**header, "choices": [choice], **tracked.field()})
        if event.finished:
            finished[event.index] = event.output
    if tracked.final:
        yield sse({**header, "choices": [], "usage": usage(prompts, list(finished.values()))})
    yield "data: [DONE]\n\n"


# ---- /v1/chat/completions -----------------------------------------------------------------------


async def create_chat_completion(ctx: ServerContext, body: ChatCompletionRequest, request: Request):
    check_model(ctx, body.model)
    tools = offered_tools(ctx, body)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
    check_capacity(ctx, 1, body.n)
    prompt = await chat_prompt(ctx, body, tools)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = max(ctx.client.limits.context_length - len(prompt.ids), 1)
    fields = {**common_fields(body), "seed": body.seed, "max_new_tokens": max_tokens, "logprobs": body.logprobs,
              "top_logprobs": body.top_logprobs or 0, "structural_tag": forced_tool_call(ctx, body, tools)}
    names = _CHAT_FIELDS if body.max_completion_tokens is not None else {**_CHAT_FIELDS, "max_new_tokens": "max_tokens"}
    params = sampling_params(fields, names)
    check_request(ctx, prompt, params, "messages")
    response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    generations = await make_generations(ctx, response_id, [prompt], [params], body.n, request, body.stream)
    fmt = AnswerFormat(ctx.config.reasoning_parser, ctx.config.tool_call_parser if tools else None,
                       body.parallel_tool_calls)
    if body.stream:
        return sse_stream(stream_chat(ctx, body, fmt, prompt, generations, response_id, created), response_id)
    outputs = await collect(generations, request)
    if outputs is None:
        return client_gone()
    choices = []
    for i, out in enumerate(outputs):
        message, finish_reason = answer_message(fmt, out.text, out.finish_reason)
        choices.append({"index": i, "message": message, "finish_reason": finish_reason,
                        "logprobs": chat_logprobs(ctx, out.token_ids, out.logprobs) if body.logprobs else None})
    return JSONResponse({"id": response_id, "object": "chat.completion", "created": created,
                         "model": ctx.model_name, "choices": choices, "usage": usage([prompt], outputs)})


def offered_tools(ctx: ServerContext, body: ChatCompletionRequest) -> Optional[list[dict[str, Any]]]:
    """The tools the model is shown (None for none, or with tool_choice "none"), checked against the request."""
    if not body.tools or body.tool_choice == "none":
        if isinstance(body.tool_choice, NamedToolChoice) or body.tool_choice == "required":
            raise APIError(400, "tool_choice asks for a tool call, but the request offers no tools", param="tools")
        return None
    if ctx.config.tool_call_parser is None:
        raise APIError(400, "tools need a server started with --tool-call-parser (llama3 or hermes)", param="tools")
    names = [tool.function.name for tool in body.tools]
    if isinstance(body.tool_choice, NamedToolChoice) and body.tool_choice.function.name not in names:
        raise APIError(400, f"tool_choice names the function {reprlib.repr(body.tool_choice.function.name)}, "
                            "which is not among the tools", param="tool_choice")
    return [tool.model_dump(exclude_none=True) for tool in body.tools]


def forced_tool_call(ctx: ServerContext, body: ChatCompletionRequest, tools: Optional[list[dict[str, Any]]]
                     ) -> Optional[str]:
    """The grammar (a structural tag) that makes the answer a call, for tool_choice "required" or a named one."""
    if tools is None or body.tool_choice in (None, "auto"):
        return None
    assert ctx.config.tool_call_parser is not None
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedToolChoice) else body.tool_choice
    try:
        return tool_grammar(ctx.config.tool_call_parser, tools, choice, body.parallel_tool_calls,
                            compact=ctx.client.config.constrained_json_disable_any_whitespace)
    except Exception as e:  # a parameters schema xgrammar cannot take
        raise APIError(400, f"the tools cannot be enforced: {e}", param="tools") from e


async def chat_prompt(ctx: ServerContext, body: ChatCompletionRequest,
                      tools: Optional[list[dict[str, Any]]] = None) -> Prompt:
    text = await render_messages(ctx, body.messages, tools, body.chat_template_kwargs)
    return Prompt(text, await encode_prompt(ctx, text, "messages", add_special_tokens=False))


async def render_messages(ctx: ServerContext, messages: list[ChatMessage], tools: Optional[list[dict[str, Any]]],
                          template_kwargs: Optional[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The chat template's text for `messages`; a 400 naming the problem if the template cannot take them."""
    if not getattr(ctx.tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
    try:
        rendered = [chat_message(m) for m in messages]
    except UnsupportedContent as e:
        raise APIError(400, str(e), param="messages") from e
    assert ctx.client.limits is not None
    try:  # the rendered prompt is at least as long as the contents
        ctx.tokenization.check_fits("".join(m["content"] or "" for m in rendered), ctx.client.limits.context_length)
        return await ctx.tokenization.render_chat(rendered, tools, template_kwargs, add_generation_prompt)
    except TooLongForContext as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from e
    except Exception as e:  # templates raise on roles or orders they do not accept
        raise APIError(400, f"the chat template rejected the messages: {e}", param="messages") from e


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


def chat_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates take it: role and content, and a tool exchange's fields where given."""
    if message.role not in CHAT_ROLES:
        raise APIError(400, f"unknown message role {reprlib.repr(message.role)}; roles are {', '.join(CHAT_ROLES)}",
                       param="messages")
    rendered: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.tool_calls is not None:
        rendered["tool_calls"] = [_call_for_template(call) for call in message.tool_calls]
        rendered["content"] = message.text() if message.content is not None else None
    for name in ("name", "tool_call_id"):
        if getattr(message, name) is not None:
            rendered[name] = getattr(message, name)
    return rendered


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    """An earlier tool call with its arguments as a mapping: templates (Llama 3, Qwen) render them with tojson."""
    function = call.get("function")
    if isinstance(function, dict) and isinstance(function.get("arguments"), str):
        try:
            return {**call, "function": {**function, "arguments": json.loads(function["arguments"])}}
        except json.JSONDecodeError:
            pass
    return call


def chat_logprobs(ctx: ServerContext, token_ids: list[int], entries: Optional[list[TokenLogprob]]
                  ) -> dict[str, list]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(ctx.tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(t, e.logprob), "top_logprobs": [item(a, lp) for a, lp in with_chosen(t, e)]}
                        for t, e in zip(token_ids, entries or [])]}


def with_chosen(token_id: int, entry: TokenLogprob) -> list[tuple[int, float]]:
    """The top alternatives, and the chosen token after them when it is not among them (so up to k + 1 entries,
    as OpenAI and vLLM return); none when none were asked for."""
    top = list(entry.top)
    if top and all(t != token_id for t, _ in top):
        top.append((token_id, entry.logprob))
    return top


async def stream_chat(ctx: ServerContext, body: ChatCompletionRequest, fmt: AnswerFormat, prompt: Prompt,
                      generations: list[Generation], response_id: str, created: int) -> AsyncIterator[str]:
    tracked = StreamUsage(body.stream_options, [prompt])
    header = {"id": response_id, "object": "chat.completion.chunk", "created": created, "model": ctx.model_name}
    for g in generations:
        delta = {"role": "assistant", "content": ""}
        yield sse({**header, "choices": [{"index": g.index, "delta": delta, "logprobs": None,
                                          "finish_reason": None}], **tracked.field()})
    finished: list[RequestOutput] = []
    answers = {g.index: StreamedAnswer(fmt) for g in generations}

    def chunk(index: int, delta: dict[str, Any], logprobs: Any = None, finish_reason: Optional[str] = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return sse({**header, "choices": [choice], **tracked.field()})

    async for event in merged_events(generations):
        if event.error is not None:
            yield sse({"error": APIError(500, event.error, type="internal_error").body()["error"]})
            continue
        tracked.add(event.token_ids)
        logprobs = chat_logprobs(ctx, event.token_ids, event.logprobs) if body.logprobs and event.logprobs else None
        deltas = answers[event.index].feed(event.text) if event.text else []
        if logprobs and not deltas:
            deltas = [{"content": ""}]  # the tokens' log-probs go out now, their text once it is decided
        for i, delta in enumerate(deltas):
            yield chunk(event.index, delta, logprobs if i == 0 else None)
        if event.finished:
            finished.append(event.output)
            deltas, finish_reason = answers[event.index].finish(event.finish_reason)
            for delta in deltas:
                yield chunk(event.index, delta)
            yield chunk(event.index, {}, finish_reason=finish_reason)
    if tracked.final:
        yield sse({**header, "choices": [], "usage": usage([prompt], finished)})
    yield "data: [DONE]\n\n"


# ---- /tokenize, /detokenize (vLLM's) -------------------------------------------------------------


async def tokenize(ctx: ServerContext, body: TokenizeRequest) -> dict[str, Any]:
    if body.model is not None:
        check_model(ctx, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give either prompt or messages", param="prompt")
    if body.messages is not None:
        text = await render_messages(ctx, body.messages, None, None, body.add_generation_prompt)
        ids = await encode_prompt(ctx, text, "messages", add_special_tokens=False)
    else:
        assert body.prompt is not None
        ids = await encode_prompt(ctx, body.prompt, "prompt", body.add_special_tokens)
    assert ctx.client.limits is not None
    return {"count": len(ids), "max_model_len": ctx.client.limits.context_length, "tokens": ids}


async def detokenize(ctx: ServerContext, body: DetokenizeRequest) -> dict[str, Any]:
    if body.model is not None:
        check_model(ctx, body.model)
    assert ctx.client.limits is not None
    vocab = ctx.client.limits.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    return {"prompt": await ctx.tokenization.decode(body.tokens)}
