"""Runs model work off the event loop, one worker thread per request.

A narrow interface that a continuous-batching engine can later replace:

* `submit(generation, stream)` admits a `model_store.generate.Generation` (or raises
  `EngineBusy` when every worker is taken and the queue is full) and starts it; the
  returned `Job` is an async iterator of `Delta`s and stops its thread when it is closed
  (a client that disconnects), cancelled, or past its deadline (`EngineTimeout`);
* `complete(generation)` runs one to the end and returns its completions;
* `run(fn, *args)` runs any other blocking call (scoring) on the same workers;
* `in_flight` counts the sequences being generated now, `queued` the generations waiting,
  `finished` the generations done by outcome (completed, cancelled, timeout, error).

It does not batch: each request's n sequences step together, requests do not.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from model_store.generate import Completion, Delta, Generation

T = TypeVar("T")
_END = object()


class EngineBusy(Exception):
    """Every worker is busy and the queue is full: try again shortly."""


class EngineTimeout(Exception):
    """The work ran past the request deadline and was stopped."""


class Job:
    """One submitted generation: iterate it for deltas; closing it stops the generation."""

    def __init__(self, engine: Engine, generation: Generation, stream: bool):
        self.engine, self.generation, self.stream = engine, generation, stream
        self.deadline = time.monotonic() + engine.timeout_s
        self.stopped = threading.Event()
        self.timed_out = False
        self.cancelled = False
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        with engine.lock:
            engine.queued += 1
            engine.jobs.add(self)
        self._future = self._loop.run_in_executor(engine.executor, self._work)

    def _post(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.stopped.set()

    def _work(self) -> None:
        n, outcome = self.generation.n, "error"
        with self.engine.lock:
            self.engine.queued -= 1
            self.engine.in_flight += n
        try:
            outcome = self._generate()
        finally:
            with self.engine.lock:
                self.engine.in_flight -= n
                self.engine.finished[outcome] += 1
                self.engine.jobs.discard(self)
            self._post(_END)

    def _generate(self) -> str:
        if self.stopped.is_set():
            return "cancelled"
        for delta in self.generation:
            if self.stopped.is_set():
                return "cancelled"
            if time.monotonic() > self.deadline:
                self.timed_out = True
                return "timeout"
            if self.stream:
                self._post(delta)
        return "completed"

    def stop(self) -> None:
        self.stopped.set()

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            while (item := await self._queue.get()) is not _END:
                yield item
            if self.cancelled:
                raise EngineBusy("the server is shutting down")
            await self._future  # re-raises what the worker raised
            if self.timed_out:
                raise EngineTimeout(f"generation stopped after {self.engine.timeout_s:g} s")
        finally:
            self.stop()

    async def wait(self) -> list[Completion]:
        async for _ in self:
            pass
        return self.generation.completions


class Engine:
    def __init__(self, workers: int = 4, max_queue: int = 64, timeout_s: float = 60.0):
        self.workers, self.max_queue, self.timeout_s = workers, max_queue, timeout_s
        self.lock = threading.Lock()
        self.in_flight = 0  # sequences being generated
        self.queued = 0  # generations admitted but not yet started
        self.busy = 0  # submitted calls not yet finished
        self.finished: Counter[str] = Counter()  # generations by outcome: completed, cancelled, timeout, error
        self.jobs: set[Job] = set()
        self.executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        return self.executor is not None

    def start(self) -> None:
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="lyrics-engine")

    def stop(self) -> None:
        """Stop every job, wait for the workers, and end the streams of jobs that never started."""
        jobs = list(self.jobs)
        for job in jobs:
            job.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None
        for job in list(self.jobs):  # the ones still here never started
            job.cancelled = True
            job._queue.put_nowait(_END)

    def _admit(self) -> None:
        if not self.running:
            raise EngineBusy("the engine is not running")
        with self.lock:
            if self.busy >= self.workers + self.max_queue:
                raise EngineBusy(f"{self.busy} requests are running or waiting; try again shortly")
            self.busy += 1

    def _release(self, _future=None) -> None:
        with self.lock:
            self.busy -= 1

    def submit(self, generation: Generation, stream: bool = True) -> Job:
        self._admit()
        job = Job(self, generation, stream)
        job._future.add_done_callback(self._release)
        return job

    async def complete(self, generation: Generation) -> list[Completion]:
        return await self.submit(generation, stream=False).wait()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        self._admit()
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        future.add_done_callback(self._release)
        return await future
