"""The engine: generations run off the event loop, stop when their consumer goes away, and are counted."""

from __future__ import annotations

import time

import anyio
import pytest

from app.engine import Engine, EngineBusy, EngineTimeout
from model_store.generate import Generation, SamplingParams, generate

pytestmark = pytest.mark.anyio


@pytest.fixture
def engine():
    engine = Engine(workers=2, max_queue=1, timeout_s=30)
    engine.start()
    yield engine
    engine.stop()


def long_generation(ck, n=2) -> Generation:
    return Generation(ck.model, ck.vocab, "分开", 1_000_000, SamplingParams(temperature=1.0), seed=0, n=n)


async def wait_until(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await anyio.sleep(0.01)


async def test_streamed_deltas_add_up_to_model_store_output(engine, checkpoints):
    ck = checkpoints["gru"]
    generation = Generation(ck.model, ck.vocab, "分开", 40, SamplingParams(temperature=0.8), seed=3, n=2)
    texts = {0: "", 1: ""}
    async for delta in engine.submit(generation):
        texts[delta.index] += delta.text
    expected = generate(ck.model, ck.vocab, "分开", 40, SamplingParams(temperature=0.8), seed=3, n=2)
    assert [texts[0], texts[1]] == [c.generated for c in expected]
    assert engine.in_flight == 0 and engine.finished["completed"] == 1


async def test_complete_returns_the_completions(engine, checkpoints):
    ck = checkpoints["rnn"]
    completions = await engine.complete(Generation(ck.model, ck.vocab, "分开", 25))
    assert completions == generate(ck.model, ck.vocab, "分开", 25)


async def test_closing_the_stream_stops_the_generation(engine, checkpoints):
    job = engine.submit(long_generation(checkpoints["gru"], n=2))
    deltas = aiter(job)
    await anext(deltas)
    assert engine.in_flight == 2
    await deltas.aclose()  # what a disconnected client's response does
    await wait_until(lambda: engine.in_flight == 0)
    assert engine.finished["cancelled"] == 1 and engine.finished["completed"] == 0
    assert not engine.jobs


async def test_cancelling_the_consumer_stops_the_generation(engine, checkpoints):
    async def consume(job):
        async for _ in job:
            pass

    job = engine.submit(long_generation(checkpoints["gru"], n=1))
    with anyio.move_on_after(0.2):
        await consume(job)
    await wait_until(lambda: engine.in_flight == 0)
    assert engine.finished["cancelled"] == 1


async def test_the_deadline_stops_a_generation(checkpoints):
    engine = Engine(workers=1, max_queue=0, timeout_s=0.2)
    engine.start()
    try:
        start = time.monotonic()
        with pytest.raises(EngineTimeout):
            await engine.complete(long_generation(checkpoints["gru"], n=1))
        assert time.monotonic() - start < 5
        assert engine.finished["timeout"] == 1 and engine.in_flight == 0
    finally:
        engine.stop()


async def test_admission_is_bounded_by_workers_and_queue(engine, checkpoints):
    ck = checkpoints["gru"]
    jobs = [engine.submit(long_generation(ck, n=1)) for _ in range(3)]  # 2 workers + 1 queued
    await wait_until(lambda: engine.in_flight == 2 and engine.queued == 1)
    with pytest.raises(EngineBusy):
        engine.submit(long_generation(ck, n=1))
    with pytest.raises(EngineBusy):
        await engine.run(sum, [1, 2])
    for job in jobs:
        job.stop()
    for job in jobs:
        await job.wait()
    await wait_until(lambda: engine.busy == 0)
    assert await engine.run(sum, [1, 2]) == 3
    assert engine.in_flight == 0 and engine.queued == 0


async def test_stop_ends_every_job(checkpoints):
    engine = Engine(workers=1, max_queue=2, timeout_s=30)
    engine.start()
    ck = checkpoints["gru"]
    running = engine.submit(long_generation(ck, n=1))
    waiting = engine.submit(long_generation(ck, n=1))
    await wait_until(lambda: engine.in_flight == 1)
    engine.stop()
    assert not engine.running and engine.in_flight == 0
    await running.wait()
    with pytest.raises(EngineBusy):
        await waiting.wait()
    with pytest.raises(EngineBusy):
        engine.submit(long_generation(ck, n=1))


async def test_worker_errors_reach_the_caller(engine):
    class Broken:
        n = 1

        def __iter__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await engine.complete(Broken())
    assert engine.finished["error"] == 1 and engine.in_flight == 0
