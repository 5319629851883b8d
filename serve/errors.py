"""One error body everywhere: `{"error": "<code>", "detail": "<human text>"}`.

Our own failures are `ApiError`s; `install(app)` makes FastAPI's validation errors (422), Starlette's
404/405 and any unexpected exception (500) answer in the same shape, and `RESPONSES` documents every
status in the OpenAPI schema so clients and API fuzzers know what to expect.
Client errors are logged as one INFO line; only server faults (500) get a traceback at ERROR.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ray.serve")


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: str = Field(description="short machine-readable code, e.g. too_many_pixels, overloaded")
    detail: str = Field(description="what went wrong, for a person")


class ApiError(Exception):
    """A client-visible failure: HTTP status, a short machine-readable code and a human message."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


def retry_after(seconds: float) -> dict[str, str]:
    """A Retry-After header in whole seconds, rounded up, at least 1."""
    return {"Retry-After": str(max(1, int(-(-seconds // 1))))}


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


# Error code for an HTTP status raised by a framework (FastAPI's routing, Serve's proxy) rather than by our code.
HTTP_ERROR_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    408: "timeout",
    413: "body_too_large",
    499: "client_disconnected",
    500: "internal_error",
    503: "unavailable",
}


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    # ("query", "temperature") -> "temperature"; ("body",) -> "body"
    parts = [str(p) for p in loc]
    return ".".join(parts[1:]) if len(parts) > 1 else ".".join(parts)


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the ErrorBody shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status < 500 or exc.status == 503:
            log.info("%s %s -> %d %s: %s", request.method, request.url.path, exc.status, exc.code, exc.detail)
        return error_response(exc.status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{_location(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in exc.errors())
        log.info("%s %s -> 422 invalid_parameter: %s", request.method, request.url.path, detail)
        return error_response(422, "invalid_parameter", detail or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_ERROR_CODES.get(exc.status_code, f"http_{exc.status_code}")
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.url.path}; see /docs"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, code, detail, dict(exc.headers or {}))

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after sending this, so Serve still logs the traceback of a real fault.
        return error_response(500, "internal_error", f"the server failed: {type(exc).__name__}")


def _doc(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": ErrorBody, "description": description}
    if headers:
        entry["headers"] = headers
    return entry


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
_BEARER = {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}

# The statuses each kind of route can answer with, for `responses=` on the route decorators.
COMMON: dict[int | str, dict[str, Any]] = {
    401: _doc("missing or wrong API key (only when one is configured)", _BEARER),
    422: _doc("a query parameter out of range or of the wrong type"),
}
OVERLOAD: dict[int | str, dict[str, Any]] = {
    503: _doc("at capacity, or a model replica is unavailable: retry after Retry-After seconds", _RETRY_AFTER),
    504: _doc("a model stage did not answer within the request timeout"),
}
BODY: dict[int | str, dict[str, Any]] = {
    400: _doc("malformed body: empty, not an image, truncated, corrupt, bad multipart"),
    408: _doc("the request body did not arrive within the body-read deadline"),
    413: _doc("body, multipart part count or pixel count above the limit"),
    415: _doc("Content-Type or image format not accepted (PNG, JPEG, WebP)"),
}
PLAN: dict[int | str, dict[str, Any]] = {
    409: _doc("the plan was made by another model (fingerprint mismatch)"),
}
