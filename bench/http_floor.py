"""The HTTP side of serving alone: a FastAPI endpoint that does no model work, and an open-loop load.

`bench/engine_speed.py --http-rates` runs both in processes of their own beside the engine, to
measure what HTTP work costs the model on the same cores when it shares no GIL with it: the most
any HTTP front end in its own process could leave. The endpoint takes and answers the shape of
`POST /generate` (pydantic body and response, 50 or 200 characters of text) and is the cheapest
FastAPI can serve it: no middleware, dependencies, logging or metrics; uvicorn runs it with
uvloop and httptools, as `lyrics serve` does.

    python bench/http_floor.py serve --port PORT
    python bench/http_floor.py drive URL RATE SECONDS    # prints "ready", then: requests seconds
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aiohttp
from fastapi import FastAPI
from pydantic import BaseModel, Field


class Request(BaseModel):
    prefix: str = Field(min_length=1, max_length=1000)
    max_chars: int = Field(50, ge=1, le=1000)
    model: str | None = None
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None


class Usage(BaseModel):
    prompt_chars: int
    generated_chars: int


class Response(BaseModel):
    model: str
    prefix: str
    text: str
    generated: str
    usage: Usage


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/generate", response_model=Response)
    async def generate(body: Request) -> Response:
        generated = "的" * body.max_chars
        return Response(model=body.model or "echo", prefix=body.prefix, text=body.prefix + generated,
                        generated=generated, usage=Usage(prompt_chars=len(body.prefix), generated_chars=body.max_chars))

    @app.get("/readyz")
    async def ready() -> dict:
        return {"status": "ready"}

    return app


async def drive(url: str, rate: float, seconds: float) -> tuple[int, float]:
    """POST /generate `rate` times a second for `seconds`, whatever the answers' pace (open loop: a
    closed loop would take every core it can). Returns the requests answered and the seconds taken."""
    answered = 0

    async def one(i: int, http: aiohttp.ClientSession) -> None:
        nonlocal answered
        body = {"prefix": "分开", "max_chars": (50, 200)[i % 2], "seed": i}
        async with http.post(f"{url}/generate", json=body) as r:
            r.raise_for_status()
            await r.read()
            answered += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as http:
        print("ready", flush=True)
        began, sent, tasks = time.perf_counter(), 0, []
        while time.perf_counter() - began < seconds:
            tasks.append(asyncio.create_task(one(sent, http)))
            sent += 1
            await asyncio.sleep(max(0.0, began + sent / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
        return answered, time.perf_counter() - began


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        import uvicorn

        p = argparse.ArgumentParser(prog="http_floor.py serve")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=8001)
        args = p.parse_args(sys.argv[2:])
        uvicorn.run(create_app(), host=args.host, port=args.port, loop="uvloop", http="httptools",
                    log_level="warning", access_log=False)
    elif sys.argv[1:2] == ["drive"]:
        answered, took = asyncio.run(drive(sys.argv[2], float(sys.argv[3]), float(sys.argv[4])))
        print(answered, f"{took:.3f}")
    else:
        sys.exit(__doc__)
