"""OpenAI-style errors: every failure is `{"error": {"message", "type", "param", "code"}}` with its status."""

from __future__ import annotations

from typing import Optional

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


async def api_error_handler(_: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, APIError)
    return error.response()


async def validation_error_handler(_: Request, error: Exception) -> JSONResponse:
    """Malformed JSON and wrong types are the client's error: 400, never FastAPI's default 422."""
    assert isinstance(error, RequestValidationError)
    first = error.errors()[0] if error.errors() else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"invalid JSON: {first.get('msg', '')}").response()
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param).response()


async def internal_error_handler(_: Request, error: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {error}", type="internal_error").response()
