"""One JSON error shape for every 4xx and 5xx answer:

    {"error": {"type": "validation_error", "message": "what to change", "details": [...]}}

`details` is present for request problems tied to fields: a list of {"loc", "msg", "type"}
(plus "characters" for unknown characters). A 500 says only that the server failed; the
trace goes to the log, never to the client.

Under /v1/ (the OpenAI-compatible API) the same errors take that ecosystem's shape,

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": "limit_exceeded"}}

with `code` our `type`, `param` the first invalid field, a field problem answered 400 (its
clients expect it) and a full queue 429 with Retry-After.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from app.engine import EngineBusy, EngineStopped, EngineTimeout

log = logging.getLogger("app.errors")

TYPES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 408: "timeout",
         409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type", 422: "validation_error",
         429: "too_many_requests", 500: "internal_error", 503: "unavailable", 504: "timeout"}


class ApiError(Exception):
    """A client-facing error: raise it anywhere below a route."""

    def __init__(self, status: int, type: str, message: str, details: list[dict] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.details, self.headers = status, type, message, details, headers


def engine_error(e: BaseException) -> ApiError:
    """What a client is told when the engine refused or stopped its work, the one mapping every route
    uses: full (503 busy, retry after a second; 429 under /v1/), past the request deadline (504),
    stopped by a shutdown (503); anything else is the server's fault (500, logged)."""
    if isinstance(e, EngineBusy):
        return ApiError(503, "busy", str(e), headers={"Retry-After": "1"})
    if isinstance(e, EngineTimeout):
        return ApiError(504, "timeout", f"{e}: lower max_chars or n (LYRICS_REQUEST_TIMEOUT_S)")
    if isinstance(e, EngineStopped):
        return ApiError(503, "unavailable", str(e))
    log.error("generation failed", exc_info=e)
    return ApiError(500, "internal_error", "the generation failed; it has been logged")


def error_body(type: str, message: str, details: list[dict] | None = None) -> dict:
    error: dict[str, Any] = {"type": type, "message": message}
    if details is not None:
        error["details"] = details
    return {"error": error}


def error_response(status: int, type: str, message: str, details: list[dict] | None = None,
                   headers: dict[str, str] | None = None, scope: MutableMapping[str, Any] | None = None) -> JSONResponse:
    """The error answer. `scope` (the request's): its path picks the OpenAI shape under /v1/, and its app's
    metrics count the error by type."""
    scope = scope or {}
    metrics = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
    if metrics is not None:
        metrics.errors.labels(type).inc()
    if scope.get("path", "").startswith(OPENAI_PREFIX):
        status, body = openai_error(status, type, message, details)
        return JSONResponse(body, status_code=status, headers=headers)
    return JSONResponse(error_body(type, message, details), status_code=status, headers=headers)


OPENAI_PREFIX = "/v1/"
OPENAI_KINDS = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                429: "rate_limit_error"}


def openai_error(status: int, type: str, message: str, details: list[dict] | None = None) -> tuple[int, dict]:
    """(status, body) of an error under /v1/: field problems are 400, a full queue 429."""
    if status == 422:
        status = 400
    elif status == 503 and type == "busy":
        status = 429
    kind = OPENAI_KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    param = None
    if details:
        param = ".".join(str(p) for p in details[0]["loc"] if p != "body") or None
    return status, {"error": {"message": message, "type": kind, "param": param, "code": type}}


def field_error(loc: list, msg: str, type: str = "value_error", **extra) -> dict:
    return {"loc": list(loc), "msg": msg, "type": type, **extra}


def invalid(details: list[dict]) -> ApiError:
    """A 422 for field problems found after parsing (configurable limits, unknown characters)."""
    return ApiError(422, details[0]["type"] if len(details) == 1 else "validation_error", summary(details), details)


def summary(details: list[dict]) -> str:
    def where(loc):
        parts = [str(p) for p in loc if p != "body"]
        return ".".join(parts) if parts else "body"
    shown = "; ".join(f"{where(d['loc'])}: {d['msg']}" for d in details[:5])
    return shown + (f" (and {len(details) - 5} more)" if len(details) > 5 else "")


def clean_validation_errors(errors: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Pydantic's errors without the echoed input or non-JSON context."""
    cleaned = []
    for e in errors:
        loc, msg = list(e.get("loc", ())), e.get("msg", "invalid value")
        if e.get("type") == "json_invalid":
            ctx = e["ctx"] if isinstance(e.get("ctx"), dict) else {}
            loc, msg = ["body"], f"the body is not valid JSON: {ctx.get('error', msg)} (at character {loc[-1]})"
        cleaned.append(field_error([p if isinstance(p, int | str) else str(p) for p in loc],
                                   str(msg), str(e.get("type", "value_error"))))
    return cleaned


def is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return content_type == "application/json" or content_type.endswith("+json")


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)  # starlette types every handler for Exception
    details = clean_validation_errors(list(exc.errors()))
    if request.headers.get("content-type") and not is_json(request) and any(d["loc"] == ["body"] for d in details):
        return error_response(415, "unsupported_media_type",
                              "send the request body as JSON with the header 'Content-Type: application/json'",
                              scope=request.scope)
    if any(d["loc"] == ["body"] and d["type"] == "missing" for d in details):
        return error_response(422, "validation_error", "a JSON object body is required", details,
                              scope=request.scope)
    return error_response(422, "validation_error", summary(details), details, scope=request.scope)


async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.type, exc.message, exc.details, exc.headers, request.scope)


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    message = exc.detail if isinstance(exc.detail, str) else TYPES.get(exc.status_code, "error")
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such endpoint: {request.url.path} (see /docs)"
    elif exc.status_code == 405:
        message = f"method {request.method} is not allowed on {request.url.path} (see /docs)"
    return error_response(exc.status_code, TYPES.get(exc.status_code, "error"), message,
                          headers=getattr(exc, "headers", None), scope=request.scope)


async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "the server failed to answer this request; it has been logged",
                          scope=request.scope)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
