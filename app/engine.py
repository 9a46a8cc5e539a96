"""Continuous batching: one scheduler thread per loaded model steps every active sequence together.

    submit() ──> inbox ──> [scheduler thread: admit (prefill) ─> step batch ─> retire] ──> deltas
                 (bounded)        between steps             one model call            to each Job's
                                                            for all rows              asyncio queue

* `submit(checkpoint, request, stream)` takes a route's `model_store.generate.Request`, plain
  data (a prefix, decoding settings, seeds, stops, constraints, a start snapshot), pairs it with
  the checkpoint's model in a `Generation` (raising what that raises for a request the model
  cannot run, or `EngineBusy` when the sequences running and waiting would pass max_batch +
  max_queue) and returns a `Job`: an async iterator of `Delta`s; everything that runs the model
  runs on the model's scheduler thread. Closing or cancelling the Job, or its
  deadline (`EngineTimeout`), removes its rows from the batch before the next step.
* The scheduler admits waiting requests between steps while the batch holds fewer than
  max_batch rows; prefixes of one length are prefilled in one call. Each row samples with
  its own settings and generator, so a request gets the text it would get alone.
* `complete(checkpoint, request)` runs one to the end; `run(fn, *args)` runs any other blocking call
  (scoring) on a small thread pool; `in_flight` counts the sequences being generated,
  `queued` the generations waiting, `finished` the generations done by outcome
  (completed, cancelled, timeout, error).
* Threads: each scheduler thread runs torch with `threads` intra-op threads (LYRICS_TORCH_THREADS);
  the scoring pool, the event loop and the model loader run it single-threaded. Every thread that
  runs torch multi-threaded keeps an OpenMP team of its own, and once the teams hold more threads
  than there are cores, libgomp stops spin-waiting between parallel regions: each region then pays
  a sleep and a wake-up (a 200-character generation took 40 ms instead of 27 ms on 2 cores).
* `drain(timeout_s)` (shutdown) refuses new work with `EngineBusy` and waits for the admitted
  work to finish, up to the timeout; `stop()` then cancels whatever is left.
* `retire(model)` lets the scheduler of a model that is no longer served (after a reload)
  finish its requests and exit; a late request for that model gets a short-lived one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections import Counter, defaultdict
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import reduce
from typing import Any, TypeVar

import torch

from model_store.batch import Batch, cat_state, prefill_rows
from model_store.checkpoint import Checkpoint
from model_store.continuation import Completion, Delta, Row
from model_store.generate import Generation, Request
from model_store.mixture import LanguageModel
from model_store.vocab import Vocabulary

T = TypeVar("T")
log = logging.getLogger("app.engine")
_END = object()


class EngineBusy(Exception):
    """Too many sequences running and waiting: try again shortly."""


class EngineTimeout(Exception):
    """The work ran past the request deadline and was stopped."""


class EngineStopped(Exception):
    """The engine stopped (shutdown) before the work was done."""


ENGINE_ERRORS = (EngineBusy, EngineTimeout, EngineStopped)  # what submit, wait and iteration raise


class Job:
    """One submitted generation: iterate it for deltas; closing it stops the generation."""

    def __init__(self, engine: Engine, generation: Generation, stream: bool, label: str):
        self.engine, self.generation, self.stream, self.label = engine, generation, stream, label
        self.n = generation.request.row_count
        self.submitted = time.monotonic()
        self.admitted: float | None = None  # when its rows joined the batch
        self.first_char: float | None = None  # when its first character was generated
        self.deadline = self.submitted + engine.timeout_s
        self.stopped = False  # set by the client side, read by the scheduler between steps
        self.timed_out = self.cancelled = False
        self.error: BaseException | None = None
        self.rows: list[Row] = []
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def stop(self) -> None:
        self.stopped = True

    async def __aiter__(self) -> AsyncGenerator[Delta, None]:
        try:
            while (item := await self.queue.get()) is not _END:
                yield item
            if self.cancelled:
                raise EngineStopped("the server is shutting down")
            if self.error is not None:
                raise self.error
            if self.timed_out:
                raise EngineTimeout(f"generation stopped after {self.engine.timeout_s:g} s")
        finally:
            self.stop()

    async def wait(self) -> list[Completion]:
        async for _ in self:
            pass
        return self.completions

    @property
    def completions(self) -> list[Completion]:
        """The finished continuations, once the job has ended (empty before)."""
        return self.generation.completions


def post_all(posts: list[tuple[asyncio.Queue, Any]]) -> None:
    for queue, item in posts:
        queue.put_nowait(item)


class Scheduler:
    """The batch of one model and the thread that steps it."""

    def __init__(self, engine: Engine, model: LanguageModel, vocab: Vocabulary, label: str, retiring: bool = False):
        self.engine, self.model, self.vocab, self.label = engine, model, vocab, label
        self.retiring = retiring  # exit once idle (the model is no longer served); guarded by engine.lock
        self.inbox: list[Job] = []  # guarded by engine.lock
        self.active: set[Job] = set()  # scheduler thread only
        self.batch = Batch(self.model, self.vocab)
        self.thread = threading.Thread(target=self.loop, name=f"lyrics-batch-{id(self.model):x}", daemon=True)
        self.thread.start()

    def loop(self) -> None:
        engine = self.engine
        torch.set_num_threads(engine.threads)
        with torch.inference_mode():
            while True:
                with engine.wake:
                    while not self.inbox and not self.active and not engine.stopping and not self.retiring:
                        engine.wake.wait()
                    if engine.stopping:
                        return
                    if self.retiring and not self.inbox and not self.active:
                        engine.draining.remove(self)  # nothing left to serve: let the old model go
                        return
                    waiting = self.admissible()
                posts: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
                try:
                    if waiting:
                        self.admit(waiting, posts)
                    self.retire_stopped(posts)
                    if self.batch.rows:
                        self.step(posts)
                except Exception as e:  # a fault here must not leave clients waiting: fail them, start afresh
                    log.exception("scheduler fault; failing %d running request(s)", len(self.active))
                    self.fail_all(e, posts)
                for loop, items in posts.items():
                    try:
                        loop.call_soon_threadsafe(post_all, items)
                    except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                        pass

    def admissible(self) -> list[Job]:
        """Take the waiting jobs that fit in the batch (a job always fits an empty batch)."""
        taken, rows = [], len(self.batch.rows)
        while self.inbox and (rows == 0 or rows + self.inbox[0].n <= self.engine.max_batch):
            job = self.inbox.pop(0)
            taken.append(job)
            rows += job.n
        self.engine.queued -= len(taken)
        return taken

    def admit(self, jobs: list[Job], posts) -> None:
        by_length: dict[int, list[Job]] = defaultdict(list)
        now = time.monotonic()
        for job in jobs:
            with self.engine.lock:
                self.engine.in_flight += job.n
            job.admitted = now
            self.active.add(job)
            if not job.stopped and time.monotonic() <= job.deadline:
                by_length[len(job.generation.ids)].append(job)
        admitted = []  # (jobs, rows, logits, state, seen) of each group prefilled
        for group in by_length.values():
            try:
                rows = [row for job in group for row in job.generation.rows(owner=job)]
                admitted.append((group, rows, *prefill_rows(self.model, [j.generation for j in group])))
            except Exception as e:  # a bad request fails alone
                for job in group:
                    job.error = e
                    self.end(job, "error", posts)
        if not admitted:
            return
        # one concatenation onto the batch for all the groups (each copies the whole batch)
        rows = [row for _, group_rows, *_ in admitted for row in group_rows]
        logits = torch.cat([a[2] for a in admitted])
        state = reduce(cat_state, [a[3] for a in admitted])
        self.batch.add(rows, logits, state, torch.cat([a[4] for a in admitted]))
        for group, group_rows, *_ in admitted:
            for job in group:
                job.rows = [r for r in group_rows if r.owner is job]
                if all(r.finish for r in job.rows):
                    self.end(job, "completed", posts)

    def retire_stopped(self, posts) -> None:
        now = time.monotonic()
        for job in list(self.active):
            if job.stopped:
                self.end(job, "cancelled", posts)
            elif now > job.deadline:
                job.timed_out = True
                self.end(job, "timeout", posts)

    def step(self, posts) -> None:
        try:
            produced = self.batch.step()
        except Exception as e:  # the model failed: every active request gets the error
            for job in list(self.active):
                job.error = e
                self.end(job, "error", posts)
            return
        if self.engine.on_step is not None:
            self.engine.on_step(self.label, len(produced))
        now = time.monotonic()
        for row, text in produced:
            job = row.owner
            if job.first_char is None:
                job.first_char = now
            if text and job.stream:
                posts[job.loop].append((job.queue, row.delta(text)))
        for job in {row.owner for row, _ in produced if row.finish}:
            if job in self.active and all(r.finish for r in job.rows):
                self.end(job, "completed", posts)

    def fail_all(self, error: Exception, posts) -> None:
        self.batch = Batch(self.model, self.vocab)
        for job in list(self.active):
            job.error = error
            self.end(job, "error", posts)

    def end(self, job: Job, outcome: str, posts) -> None:
        self.active.discard(job)
        self.batch.drop({job})
        job.generation.finish(job.rows)
        if self.engine.on_end is not None:
            self.engine.on_end(job, outcome)
        with self.engine.lock:
            self.engine.in_flight -= job.n
            self.engine.pending -= job.n
            self.engine.finished[outcome] += 1
            self.engine.jobs.discard(job)
        posts[job.loop].append((job.queue, _END))


class Engine:
    """Schedulers (one per model, made on first use), admission control and the scoring pool."""

    def __init__(self, max_batch: int = 64, max_queue: int = 64, timeout_s: float = 60.0, workers: int = 2,
                 threads: int | None = None):
        self.max_batch, self.max_queue, self.timeout_s, self.workers = max_batch, max_queue, timeout_s, workers
        self.threads = threads or torch.get_num_threads()  # intra-op threads of each scheduler thread
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.in_flight = 0  # sequences in a batch
        self.queued = 0  # generations waiting for a place in a batch
        self.pending = 0  # sequences admitted and not finished, plus scoring calls
        self.finished: Counter[str] = Counter()  # generations by outcome: completed, cancelled, timeout, error
        self.jobs: set[Job] = set()
        # Keyed by id(model): the scheduler holds its model, so the id cannot be reused while it is here.
        self.schedulers: dict[int, Scheduler] = {}
        self.draining: list[Scheduler] = []  # retired, finishing their requests; each removes itself when done
        self.retired: weakref.WeakSet = weakref.WeakSet()  # models no longer served
        self.executor: ThreadPoolExecutor | None = None
        self.stopping = False
        self.closing = False  # draining for shutdown: new work gets EngineBusy, running work finishes
        # observers (app/metrics.py), called on a scheduler thread: on_step(label, rows) after each batch step,
        # on_end(job, outcome) when a generation ends
        self.on_step: Callable[[str, int], None] | None = None
        self.on_end: Callable[[Job, str], None] | None = None

    @property
    def running(self) -> bool:
        return self.executor is not None

    def start(self) -> None:
        self.stopping = self.closing = False
        self.executor = ThreadPoolExecutor(self.workers, thread_name_prefix="lyrics-score",
                                           initializer=torch.set_num_threads, initargs=(1,))

    async def drain(self, timeout_s: float) -> bool:
        """Shutdown, first half: refuse new work (EngineBusy) and wait up to timeout_s for the generations
        and scoring calls already admitted to finish. True when everything finished; `stop()` ends the rest."""
        self.closing = True
        deadline = time.monotonic() + max(timeout_s, 0.0)
        while self.running and self.pending > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.pending <= 0

    def stop(self) -> None:
        """Stop the schedulers; running and waiting jobs end as cancelled (EngineStopped)."""
        if self.executor is None:
            return
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
        schedulers = [*self.schedulers.values(), *self.draining]
        for scheduler in schedulers:
            scheduler.thread.join()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.executor = None
        for scheduler in schedulers:
            posts: dict = defaultdict(list)
            for job in list(scheduler.active):
                scheduler.end(job, "cancelled", posts)
            for job in scheduler.inbox:
                job.cancelled = True
                posts[job.loop].append((job.queue, _END))
            self.queued -= len(scheduler.inbox)
            scheduler.inbox.clear()
            for items in posts.values():
                post_all(items)  # stop() runs on the event loop (the lifespan)
        self.schedulers.clear()
        self.draining.clear()

    def _admit(self, units: int) -> None:
        if not self.running:
            raise EngineBusy("the engine is not running")
        if self.closing:
            raise EngineBusy("the server is shutting down")
        with self.lock:
            if self.pending + units > self.max_batch + self.max_queue and self.pending > 0:
                raise EngineBusy(f"{self.pending} sequences are running or waiting; try again shortly")
            self.pending += units

    def _release(self, units: int) -> None:
        with self.lock:
            self.pending -= units

    def submit(self, checkpoint: Checkpoint, request: Request, stream: bool = True) -> Job:
        """Queue a request on the checkpoint's model; the checkpoint's name tags its metrics. Raises what
        `Generation` raises for a request this model cannot run (ValueError, UnknownCharactersError,
        ConstraintError) before anything is queued."""
        model, label = checkpoint.model, checkpoint.name
        generation = Generation(model, checkpoint.vocab, request)
        self._admit(request.row_count)
        job = Job(self, generation, stream, label)
        with self.wake:
            key = id(model)
            scheduler = self.schedulers.get(key)
            if scheduler is None and model in self.retired:
                # a request that looked its model up before a reload: served by a scheduler that exits after it
                scheduler = Scheduler(self, model, checkpoint.vocab, label, retiring=True)
                self.draining.append(scheduler)
            elif scheduler is None:
                scheduler = self.schedulers[key] = Scheduler(self, model, checkpoint.vocab, label)
            scheduler.inbox.append(job)
            self.queued += 1
            self.jobs.add(job)
            self.wake.notify_all()
        return job

    def retire(self, model) -> None:
        """The model is no longer served: its scheduler finishes the requests it has, then its thread exits."""
        with self.wake:
            self.retired.add(model)
            scheduler = self.schedulers.pop(id(model), None)
            if scheduler is not None:
                scheduler.retiring = True
                self.draining.append(scheduler)
                self.wake.notify_all()

    async def complete(self, checkpoint: Checkpoint, request: Request) -> list[Completion]:
        return await self.submit(checkpoint, request, stream=False).wait()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        self._admit(1)
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        future.add_done_callback(lambda _: self._release(1))
        return await future
