"""Optional API keys (LYRICS_API_KEYS) and the bearer-token check the admin endpoint shares.

`ApiKeys` is pure ASGI middleware, like app/middleware.py, so it answers 401 before the
body is read and before routing. /healthz and /readyz stay open for probes, /docs and
/openapi.json so clients can read the schema, and /admin/* checks its own token.
Keys are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from fastapi import FastAPI

from app.errors import error_response

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
ADMIN_PREFIX = "/admin/"
DOCS_STATIC = "/docs-static"  # Swagger UI's own files, served with /docs


def parse_keys(value: str) -> list[str]:
    return [key.strip() for key in value.split(",") if key.strip()]


def matches(candidate: str | None, keys: list[str]) -> bool:
    """Whether `candidate` is one of `keys`, comparing against every key without stopping early.
    Hashing first makes the comparisons equal-length, so not even the length leaks."""
    if candidate is None:
        return False
    digest = hashlib.sha256(candidate.encode()).digest()
    found = False
    for key in keys:
        found |= hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest())
    return found


def presented_key(headers: dict[bytes, bytes], api_key_header: bool = True) -> str | None:
    """The token of `Authorization: Bearer TOKEN`, else (when allowed) of `X-API-Key: TOKEN`."""
    auth = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = headers.get(b"x-api-key", b"").decode("latin-1").strip() if api_key_header else ""
    return key or None


def unauthorized(message: str, scope: dict | None = None):
    return error_response(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"}, scope=scope)


class ApiKeys:
    def __init__(self, app, keys: list[str]):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":  # lifespan has no path: reading one first kept a keyed server from starting
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path in PUBLIC_PATHS or path.startswith((ADMIN_PREFIX, DOCS_STATIC + "/")):
            return await self.app(scope, receive, send)
        key = presented_key(dict(scope["headers"]))
        if not matches(key, self.keys):
            message = ("a valid API key is required: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
                       if key is None else "the API key is not valid")
            return await unauthorized(message, scope)(scope, receive, send)
        await self.app(scope, receive, send)


def declare_security(app: FastAPI) -> None:
    """Add the bearer and X-API-Key schemes to the OpenAPI schema; the public paths need neither."""
    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = plain_openapi()  # which keeps it as app.openapi_schema
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
            schema["security"] = [{"bearer": []}, {"apiKey": []}]
            for path, operations in schema.get("paths", {}).items():
                if path in PUBLIC_PATHS:
                    for operation in operations.values():
                        operation["security"] = []
        assert app.openapi_schema is not None
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
