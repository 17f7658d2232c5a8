"""OpenAI-style errors: every failure is `{"error": {"message", "type", "param", "code"}}` with its status,
the framework's own (unknown route, wrong method) included."""

from __future__ import annotations

import logging
from typing import Optional

import pydantic
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error", headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def invalid_body(errors: list) -> APIError:
    """The first of pydantic's complaints about a request body, as a 400."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"invalid JSON: {first.get('msg', '')}")
    # pydantic names the union member it tried ("prompt.str", "content.list[ContentPart]"): not a field
    location = [str(part) for part in first.get("loc", ())
                if part != "body" and str(part) not in _TYPE_TAGS and "[" not in str(part)]
    param = ".".join(location) or None
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param)


def parse_body(raw: bytes, model: type[pydantic.BaseModel]):  # -> an instance of `model`
    try:
        return model.model_validate_json(raw)
    except pydantic.ValidationError as e:
        raise invalid_body(e.errors(include_input=False, include_url=False)) from None


async def api_error_handler(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, APIError)
    if error.status >= 500 and error.type != "service_unavailable":
        logger.error("%d: %s", error.status, error.message)
    return error.response()


async def validation_error_handler(_: Request, error: Exception) -> JSONResponse:
    """Wrong types in a path or query are the client's error: 400, never FastAPI's default 422."""
    assert isinstance(error, RequestValidationError)
    return invalid_body(list(error.errors())).response()


async def http_error_handler(_: Request, error: Exception) -> JSONResponse:
    """The framework's own errors (404 for an unknown route, 405 for a wrong method) in the same shape."""
    assert isinstance(error, HTTPException)
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(error.status_code, "invalid_request_error")
    return APIError(error.status_code, str(error.detail), type=kind, headers=error.headers).response()


async def internal_error_handler(_: Request, error: Exception) -> JSONResponse:
    # Starlette re-raises the exception after this answer, so the server log gets its traceback: a real fault.
    return APIError(500, f"internal error: {error}", type="internal_error").response()
