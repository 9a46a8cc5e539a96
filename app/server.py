"""`lyrics serve`: uvicorn running the app, with a graceful SIGTERM (drain the engines, then stop)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal

import uvicorn
from pydantic import ValidationError

from app.main import drain_all, uvicorn_log_config
from app.settings import Settings

# The `lyrics serve` options and the LYRICS_* variables they override.
OPTIONS = {"host": "LYRICS_HOST", "port": "LYRICS_PORT", "model_dir": "LYRICS_MODEL_DIR", "device": "LYRICS_DEVICE",
           "log_level": "LYRICS_LOG_LEVEL", "log_format": "LYRICS_LOG_FORMAT"}


class GracefulServer(uvicorn.Server):
    """On SIGTERM, first drain: the engines refuse new work with 503 (and /readyz says so) while
    the generations in flight finish, up to LYRICS_DRAIN_TIMEOUT_S; only then does uvicorn close
    its listener and shut down as usual. uvicorn re-raises the SIGTERM it shut down on, so the
    process would end killed by the signal (exit 143); a completed graceful shutdown exits 0."""

    draining = False

    def handle_exit(self, sig, frame):
        if sig == signal.SIGTERM and not self.draining and not self.should_exit:
            self.draining = True
            loop = asyncio.get_running_loop()  # the signal handler runs on the event loop's thread
            loop.call_soon_threadsafe(lambda: loop.create_task(self.drain_then_exit(sig, frame)))
            return
        super().handle_exit(sig, frame)

    async def drain_then_exit(self, sig, frame):
        await drain_all(self.config.timeout_graceful_shutdown or 0)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            captured = getattr(self, "_captured_signals", None)
            if isinstance(captured, list):
                captured[:] = [s for s in captured if s != signal.SIGTERM]


def serve(**options: object) -> None:
    """Run the service until SIGTERM or Ctrl-C. `options` (see OPTIONS) override the LYRICS_*
    environment; None leaves a setting to it. Raises ValueError for an invalid setting."""
    for option, value in options.items():
        if value is not None:
            os.environ[OPTIONS[option]] = str(value)
    try:
        settings = Settings()
    except ValidationError as e:
        raise ValueError(f"invalid LYRICS_* setting: {e}") from e
    # On SIGTERM the engines drain first (new requests: 503), then uvicorn stops accepting, waits up to the
    # graceful timeout for open connections, the lifespan stops the engine and the process exits 0.
    config = uvicorn.Config("app.main:create_app", factory=True, host=settings.host, port=settings.port,
                            log_level=settings.log_level, access_log=False,
                            log_config=uvicorn_log_config(settings.log_format) or uvicorn.config.LOGGING_CONFIG,
                            timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s))
    GracefulServer(config).run()
