"""Assembles the service: `create_app(settings)` and the lifespan that loads the models.

    uvicorn --factory app.main:create_app      (what `lyrics serve` and `make run` start)
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import torch
from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi_offline import FastAPIOffline
from pythonjsonlogger.json import JsonFormatter

from app import errors
from app.engine import Engine
from app.metrics import Metrics
from app.middleware import BodyLimit, RequestMetrics
from app.routes import admin, compare, generate, health, models, openai, perplexity
from app.security import DOCS_STATIC, ApiKeys, declare_security, parse_keys
from app.served import StartupError, load_models
from app.settings import Settings
from model_store.state import StateCodec

log = logging.getLogger("app")

# GET /: one self-contained page (inline CSS and JS, no external URL), read once at import.
PLAYGROUND = (Path(__file__).parent / "static" / "playground.html").read_text(encoding="utf-8")

DESCRIPTION = """Character-level RNN, GRU and LSTM language models that write lyrics.

Every error is `{"error": {"type", "message", "details"?}}`: 404 for an unknown model or
path, 422 for an invalid field (with `details`), 413 for an oversized body, 503 when busy.

When the server is configured with API keys, every endpoint but `/healthz`, `/readyz` and
these docs needs `Authorization: Bearer KEY` (or `X-API-Key: KEY`); without one: 401.
"""


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    # Only the schedulers' threads get torch's intra-op pool (see Engine): every other thread of the
    # server, this one and the loader included, runs torch single-threaded.
    torch.set_num_threads(1)
    try:
        served = await anyio.to_thread.run_sync(load_models, settings)
    except StartupError as e:
        log.error("cannot start: %s", e)
        raise
    # The model steps run in the engine's batch threads and use torch's intra-op pool; the event
    # loop only parses requests and forwards deltas, so torch gets every core by default.
    engine = Engine(settings.max_batch, settings.max_queue, settings.request_timeout_s, settings.workers,
                    threads=settings.torch_threads or usable_cores())
    engine.start()
    app.state.models, app.state.engine = served, engine
    app.state.metrics.watch(engine, len(served.models))
    ENGINES.add(engine)
    log.info("ready: %d model(s) on %s, default %s, %d torch thread(s), batches of up to %d",
             len(served.models), served.device, served.default, engine.threads, settings.max_batch)
    try:
        yield
    finally:
        # Shutdown: uvicorn has stopped accepting and waited (up to its graceful timeout, which `lyrics serve`
        # sets to LYRICS_DRAIN_TIMEOUT_S) for open requests. The engine refuses new work (503) and gives what
        # is still running up to the drain timeout to finish; then stop() cancels the rest.
        if not await engine.drain(settings.drain_timeout_s):
            log.warning("drain timeout (%g s) passed: cancelling %d running sequence(s)",
                        settings.drain_timeout_s, engine.pending)
        app.state.models = None
        engine.stop()
        ENGINES.discard(engine)


# The engines of the apps running in this process: `lyrics serve` drains them on SIGTERM while the
# listener is still open, so requests arriving during the drain get a 503 instead of a refused connection.
ENGINES: set[Engine] = set()


async def drain_all(timeout_s: float) -> None:
    await asyncio.gather(*(engine.drain(timeout_s) for engine in list(ENGINES)))


def usable_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s"


def log_formatter(log_format: str) -> logging.Formatter:
    """`text`: one readable line; `json`: one JSON object per line (the access log's fields, request_id
    included, become keys), for log collectors."""
    if log_format == "json":
        return JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level", "name": "logger"})
    return logging.Formatter("%(levelname)s:     %(name)s: %(message)s")


def configure_logging(level: str, log_format: str = "text") -> None:
    """Our loggers print at `level`; a handler is added only when nothing else (uvicorn, pytest) set one up."""
    logger = logging.getLogger("app")
    logger.setLevel(level.upper())
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(log_formatter(log_format))
        logger.addHandler(handler)


def uvicorn_log_config(log_format: str) -> dict | None:
    """uvicorn's own log lines in JSON too (None: uvicorn's default, text)."""
    if log_format != "json":
        return None
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"json": {"()": JsonFormatter, "fmt": JSON_FIELDS,
                                    "rename_fields": {"levelname": "level", "name": "logger"}}},
            "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "json",
                                     "stream": "ext://sys.stderr"}},
            "loggers": {"uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
                        "uvicorn.error": {"level": "INFO"}}}


def state_codec(settings: Settings) -> StateCodec:
    """Signs /generate's state handles. Without LYRICS_STATE_KEY the key is random: handles then work only
    with this process (not after a restart, not on another replica)."""
    key = settings.state_key.get_secret_value().encode() if settings.state_key else b""
    if not key:
        log.info("LYRICS_STATE_KEY is not set: state handles are signed with a random key and only this "
                 "process accepts them")
        key = secrets.token_bytes(32)
    return StateCodec(key, settings.state_ttl_s)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_format)
    # FastAPIOffline: /docs and /redoc load Swagger UI and ReDoc from files shipped in the package,
    # not from a CDN, so the page works on a machine without internet
    app = FastAPIOffline(title="Lyrics RNN", version="0.1.0", description=DESCRIPTION, lifespan=lifespan,
                         static_url=DOCS_STATIC)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.state_codec = state_codec(settings)
    errors.install(app)
    routers = [module.router for module in (generate, perplexity, compare, models, openai, health)]
    if settings.admin_token and settings.admin_token.get_secret_value():
        routers.append(admin.router)
        app.state.reload_lock = asyncio.Lock()
    for router in routers:
        app.include_router(router)

    @app.get("/", include_in_schema=False, response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND)

    paths = {route.path for router in routers for route in router.routes} | {"/", "/docs", "/openapi.json"}
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    # Added after BodyLimit, so it runs first: a request without a key is refused before its body is read.
    if keys := parse_keys(settings.api_keys.get_secret_value()):
        app.add_middleware(ApiKeys, keys=keys)
        declare_security(app)
    app.add_middleware(RequestMetrics, metrics=app.state.metrics, known_paths=paths)
    return app
