"""The FastAPI app: OpenAI routes, keel's native routes, health, metrics."""

from __future__ import annotations

import dataclasses
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from keel.engine.outputs import RequestOutput
from keel.sampling_params import SamplingParams
from keel.server.disagg import add_prefill_routes, disaggregation_info
from keel.server.errors import (APIError, api_error_handler, http_error_handler, internal_error_handler, parse_body,
                                validation_error_handler)
from keel.server.openai_api import (Prompt, ServerContext, check_capacity, check_request, client_gone, collect,
                                    create_chat_completion, create_completion, detokenize, encode_prompt,
                                    make_generations, sampling_params, sse, sse_stream, tokenize)
from keel.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, GenerateRequest,
                                  TokenizeRequest)

logger = logging.getLogger(__name__)


def create_app(ctx: ServerContext) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:  # the engine started before the app (launch.serve): the lifespan only stops it
            yield
        finally:
            if ctx.remote is not None:
                await ctx.remote.close()
            await ctx.client.shutdown()
            ctx.tokenization.close()

    # No redirect from "/path/" to "/path": it would be a body-less 307 pointing at the client's Host header.
    app = FastAPI(title="keel", lifespan=lifespan, redirect_slashes=False)
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(HTTPException, http_error_handler)
    app.add_exception_handler(ClientDisconnect, client_disconnected)
    app.add_exception_handler(Exception, internal_error_handler)
    if ctx.config.api_key is not None:
        app.add_middleware(RequireAPIKey, api_key=ctx.config.api_key)
    limit = ctx.config.max_request_body_bytes

    if ctx.client.config.disaggregation_mode == "prefill":
        add_prefill_routes(app, ctx.client, lambda request: read_body(request, limit))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_body(await read_body(request, limit), CompletionRequest)
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse_body(await read_body(request, limit), ChatCompletionRequest)
        return await create_chat_completion(ctx, body, request)

    @app.post("/tokenize")
    async def tokenize_route(request: Request) -> dict:
        return await tokenize(ctx, parse_body(await read_body(request, limit), TokenizeRequest))

    @app.post("/detokenize")
    async def detokenize_route(request: Request) -> dict:
        return await detokenize(ctx, parse_body(await read_body(request, limit), DetokenizeRequest))

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": ctx.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "keel"}]}

    @app.post("/generate")
    async def generate(request: Request):
        body = parse_body(await read_body(request, limit), GenerateRequest)
        return await native_generate(ctx, body, request)

    @app.post("/abort/{request_id}")
    async def abort(request_id: str) -> dict:
        if not ctx.client.abort_request(request_id):
            raise APIError(404, f"no running request {request_id}", param="request_id")
        return {"aborted": request_id}

    @app.get("/health")
    async def health() -> Response:
        timeout = ctx.config.health_timeout
        if ctx.client.healthy(timeout):
            return JSONResponse({"status": "ok"})
        reason = ctx.client.failure or f"the engine process has sent no heartbeat for over {timeout:g} s"
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
                "engine": msgspec.structs.asdict(stats) if stats is not None else None,
                "disaggregation": disaggregation_info(ctx.client.config.disaggregation_mode, ctx.client.peer, stats)}

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read as a stream and refused (413) the moment it exceeds `limit` bytes: a huge body
    never sits in memory, and one whose Content-Length is too large is refused before any of it is read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds {limit / 2**20:g} MiB (--max-request-body-mb)",
                    code="request_too_large")


async def client_disconnected(request: Request, _: Exception) -> Response:
    logger.info("client disconnected while sending %s %s", request.method, request.url.path)
    return client_gone()


class RequireAPIKey:
    """Every route but /health needs `Authorization: Bearer <--api-key>`; others get a 401."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def native_generate(ctx: ServerContext, body: GenerateRequest, request: Request):
    """keel's own route: text or token ids in, SamplingParams by name; text, token ids and meta info out."""
    if (body.text is None) == (body.input_ids is None):
        raise APIError(400, "give exactly one of text and input_ids", param="text")
    check_capacity(ctx, 1, 1)
    ids = await encode_prompt(ctx, body.text, "text") if body.text is not None else body.input_ids
    prompt = Prompt(body.text, ids)
    unknown = set(body.sampling_params) - {f.name for f in dataclasses.fields(SamplingParams)}
    if unknown:
        raise APIError(400, f"unknown sampling parameters {sorted(unknown)}", param="sampling_params")
    params = sampling_params(body.sampling_params, {})
    check_request(ctx, prompt, params, "input_ids" if body.text is None else "text")
    request_id = f"gen-{uuid.uuid4().hex}"
    (generation,) = await make_generations(ctx, request_id, [prompt], [params], 1, request, body.stream)
    if not body.stream:
        outputs = await collect([generation], request)
        if outputs is None:
            return client_gone()
        (out,) = outputs
        return {"text": out.text, "output_ids": out.token_ids, "meta_info": meta_info(request_id, prompt, out)}

    async def events() -> AsyncIterator[str]:
        async for event in generation.events():
            yield sse({"text": event.text, "output_ids": event.token_ids,
                       "meta_info": {**meta_info(request_id, prompt, event.output),
                                     "finish_reason": event.finish_reason, "completion_tokens": event.num_tokens,
                                     "error": event.error}})
        yield "data: [DONE]\n\n"

    return sse_stream(events(), request_id)


def meta_info(request_id: str, prompt: Prompt, out: RequestOutput) -> dict:
    info = {"id": request_id, "finish_reason": out.finish_reason, "prompt_tokens": len(prompt.ids),
            "completion_tokens": len(out.token_ids), "cached_tokens": out.num_cached_tokens, "error": out.error}
    if out.spec_verify_ct:  # SGLang's names
        info.update(spec_verify_ct=out.spec_verify_ct, spec_draft_tokens=out.spec_draft_tokens,
                    spec_accepted_tokens=out.spec_accepted_tokens, spec_accept_length=out.spec_accept_length)
    return info
