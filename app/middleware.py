"""Pure ASGI middleware (no BaseHTTPMiddleware: it would break streaming and disconnects).

`BodyLimit` answers 413 for a body over the limit, whether announced by Content-Length
or only found while reading a chunked body. `RequestMetrics` counts and times every
request by its route template and writes one access-log line.
"""

from __future__ import annotations

import logging
import time

from app.errors import error_response
from app.metrics import Metrics

access_log = logging.getLogger("app.access")


class BodyLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and not length.isdigit():
            return await error_response(400, "bad_request", "invalid Content-Length header",
                                        path=scope["path"])(scope, receive, send)
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
                                  path=scope["path"])
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

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            elapsed = time.perf_counter() - start
            route, method = self.route(scope), scope["method"]
            self.metrics.requests.labels(route, method, str(status)).inc()
            self.metrics.latency.labels(route, method).observe(elapsed)
            client = scope.get("client") or ("-", 0)
            access_log.info('%s "%s %s" %d %.1f ms', client[0], method, scope["path"], status, elapsed * 1000)
