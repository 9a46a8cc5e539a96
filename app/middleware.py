"""Pure ASGI middleware (no BaseHTTPMiddleware: it would break streaming and disconnects).

`BodyLimit` answers 413 for a body over the limit, whether announced by Content-Length
or only found while reading a chunked body. `RequestMetrics` gives every request an id
(the client's `X-Request-ID` when it is a plain token, else a new one), returns it in the
`X-Request-ID` header, counts and times the request by its route template and writes one
access-log line with the id.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from app.errors import error_response
from app.metrics import Metrics

access_log = logging.getLogger("app.access")
CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and not length.isdigit():
            return await error_response(400, "bad_request", "invalid Content-Length header",
                                        scope=scope)(scope, receive, send)
        if length is not None and int(length) > self.max_bytes:
            return await self.too_large(scope, receive, send)
        # Read the whole body first (it is small: at most max_bytes), then replay it.
        messages, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                messages.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self.too_large(scope, receive, send)
            messages.append(message)
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def too_large(self, scope, receive, send):
        response = error_response(413, "payload_too_large",
                                  f"the request body is larger than {self.max_bytes} bytes (LYRICS_MAX_BODY_BYTES)",
                                  scope=scope)
        response.headers["connection"] = "close"
        await response(scope, receive, send)


class RequestMetrics:
    def __init__(self, app, metrics: Metrics, known_paths: set[str] | None = None):
        self.app, self.metrics, self.known_paths = app, metrics, known_paths or set()

    def route(self, scope) -> str:
        route = scope.get("route")
        if route is not None and hasattr(route, "path"):
            return route.path
        # answered before routing (413) or unmatched (404): keep label values bounded
        return scope["path"] if scope["path"] in self.known_paths else "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        given = dict(scope["headers"]).get(b"x-request-id", b"")
        request_id = given.decode() if CLIENT_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            elapsed = time.perf_counter() - start
            route, method = self.route(scope), scope["method"]
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(elapsed)
            client = scope.get("client") or ("-", 0)
            access_log.info('%s "%s %s" %d %.1f ms %s', client[0], method, scope["path"], status, elapsed * 1000,
                            request_id, extra={"request_id": request_id, "client": client[0], "method": method,
                                               "path": scope["path"], "status": status,
                                               "duration_ms": round(elapsed * 1000, 3)})
