"""The FastAPI app: OpenAI routes, keel's native routes, health, metrics."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from keel.engine.outputs import RequestOutput
from keel.sampling_params import SamplingParams
from keel.server.errors import APIError, api_error_handler, internal_error_handler, validation_error_handler
from keel.server.generation import Generation
from keel.server.openai_api import (Prompt, ServerContext, check_request, collect, create_chat_completion,
                                    create_completion, sampling_params, sse, sse_stream)
from keel.server.protocol import ChatCompletionRequest, CompletionRequest, GenerateRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppOptions:
    url: str  # where the server listens, for the start-up log line
    health_timeout_s: float  # /health fails if the engine has not answered for this long


def create_app(ctx: ServerContext, options: AppOptions) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ctx.client.start()  # returns once the model is loaded and the engine answers
        logger.info("keel is serving %s at %s", ctx.model_name, options.url)
        try:
            yield
        finally:
            await ctx.client.shutdown()

    app = FastAPI(title="keel", lifespan=lifespan)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(Exception, internal_error_handler)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(ctx, body, request)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "keel"}]}

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request):
        return await native_generate(ctx, body, request)

    @app.post("/abort/{request_id}")
    async def abort(request_id: str) -> dict:
        if not ctx.client.abort_request(request_id):
            raise APIError(404, f"no running request {request_id}", param="request_id")
        return {"aborted": request_id}

    @app.get("/health")
    async def health() -> Response:
        if ctx.client.healthy(options.health_timeout_s):
            return JSONResponse({"status": "ok"})
        reason = ctx.client.failure or f"the engine has not answered for over {options.health_timeout_s:g} s"
        return APIError(503, reason, type="service_unavailable").response()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(ctx.client.stats), media_type=CONTENT_TYPE_LATEST)

    @app.get("/server_info")
    async def server_info() -> dict:
        stats = ctx.client.stats
        return {"model": ctx.model_name, "limits": dataclasses.asdict(ctx.client.limits),
                "page_size": ctx.client.page_size, "pending_requests": ctx.client.num_pending,
                "engine_pid": ctx.client.engine_pid,
                "engine": dataclasses.asdict(stats) if stats is not None else None}

    return app


async def native_generate(ctx: ServerContext, body: GenerateRequest, request: Request):
    """keel's own route: text or token ids in, SamplingParams by name; text, token ids and meta info out."""
    if (body.text is None) == (body.input_ids is None):
        raise APIError(400, "give exactly one of text and input_ids", param="text")
    prompt = Prompt(body.text, ctx.tokenizer(body.text).input_ids if body.text is not None else body.input_ids)
    unknown = set(body.sampling_params) - {f.name for f in dataclasses.fields(SamplingParams)}
    if unknown:
        raise APIError(400, f"unknown sampling parameters {sorted(unknown)}", param="sampling_params")
    params = sampling_params(body.sampling_params, {})
    check_request(ctx, prompt, params, "input_ids" if body.text is None else "text")
    request_id = f"gen-{uuid.uuid4().hex}"
    generation = Generation(request_id, 0, ctx.client, ctx.metrics, ctx.tokenizer, prompt.text, prompt.ids, params)
    if not body.stream:
        (out,) = await collect([generation], request)
        return {"text": out.text, "output_ids": out.token_ids, "meta_info": meta_info(request_id, prompt, out)}

    async def events() -> AsyncIterator[str]:
        async for event in generation.events():
            yield sse({"text": event.text, "output_ids": event.token_ids,
                       "meta_info": meta_info(request_id, prompt, event.output)})
        yield "data: [DONE]\n\n"

    return sse_stream(events())


def meta_info(request_id: str, prompt: Prompt, out: RequestOutput) -> dict:
    return {"id": request_id, "finish_reason": out.finish_reason, "prompt_tokens": len(prompt.ids),
            "completion_tokens": len(out.token_ids), "cached_tokens": out.num_cached_tokens, "error": out.error}
