"""The engine: concurrent generations share one batch per model, each gets exactly what it would get alone,
stops when its consumer goes away, and is counted."""

from __future__ import annotations

import time

import anyio
import pytest
import torch

from app.engine import Engine, EngineBusy, EngineStopped, EngineTimeout
from model_store.constraints import ConstraintError, Constraints
from model_store.generate import Request, generate
from model_store.sampling import SamplingParams
from model_store.state import Snapshot
from model_store.vocab import UnknownCharactersError

pytestmark = pytest.mark.anyio


@pytest.fixture
def engine():
    engine = Engine(max_batch=2, max_queue=1, timeout_s=30)
    engine.start()
    yield engine
    engine.stop()


def long_request(n=2) -> Request:
    return Request("分开", 1_000_000, SamplingParams(temperature=1.0), seed=0, n=n)


async def wait_until(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await anyio.sleep(0.01)


async def test_streamed_deltas_add_up_to_model_store_output(engine, checkpoints):
    ck = checkpoints["gru"]
    request = Request("分开", 40, SamplingParams(temperature=0.8), seed=3, n=2)
    texts = {0: "", 1: ""}
    async for delta in engine.submit(ck, request):
        texts[delta.index] += delta.text
    expected = generate(ck.model, ck.vocab, "分开", 40, SamplingParams(temperature=0.8), seed=3, n=2)
    assert [texts[0], texts[1]] == [c.generated for c in expected]
    assert engine.in_flight == 0 and engine.finished["completed"] == 1


async def test_complete_returns_the_completions(engine, checkpoints):
    ck = checkpoints["rnn"]
    completions = await engine.complete(ck, Request("分开", 25))
    assert completions == generate(ck.model, ck.vocab, "分开", 25)


async def test_closing_the_stream_stops_the_generation(engine, checkpoints):
    job = engine.submit(checkpoints["gru"], long_request(n=2))
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

    job = engine.submit(checkpoints["gru"], long_request(n=1))
    with anyio.move_on_after(0.2):
        await consume(job)
    await wait_until(lambda: engine.in_flight == 0)
    assert engine.finished["cancelled"] == 1


async def test_the_deadline_stops_a_generation(checkpoints):
    engine = Engine(max_batch=1, max_queue=0, timeout_s=0.2)
    engine.start()
    try:
        start = time.monotonic()
        with pytest.raises(EngineTimeout):
            await engine.complete(checkpoints["gru"], long_request(n=1))
        assert time.monotonic() - start < 5
        assert engine.finished["timeout"] == 1 and engine.in_flight == 0
    finally:
        engine.stop()


async def test_admission_is_bounded_by_batch_and_queue(engine, checkpoints):
    ck = checkpoints["gru"]
    jobs = [engine.submit(ck, long_request(n=1)) for _ in range(3)]  # a batch of 2 + 1 queued
    await wait_until(lambda: engine.in_flight == 2 and engine.queued == 1)
    with pytest.raises(EngineBusy):
        engine.submit(ck, long_request(n=1))
    with pytest.raises(EngineBusy):
        await engine.run(sum, [1, 2])
    for job in jobs:
        job.stop()
    for job in jobs:
        await job.wait()
    await wait_until(lambda: engine.pending == 0)
    assert await engine.run(sum, [1, 2]) == 3
    assert engine.in_flight == 0 and engine.queued == 0


async def test_stop_ends_every_job(checkpoints):
    engine = Engine(max_batch=1, max_queue=2, timeout_s=30)
    engine.start()
    ck = checkpoints["gru"]
    running = engine.submit(ck, long_request(n=1))
    waiting = engine.submit(ck, long_request(n=1))
    await wait_until(lambda: engine.in_flight == 1)
    engine.stop()
    assert not engine.running and engine.in_flight == 0
    await running.wait()
    with pytest.raises(EngineStopped):
        await waiting.wait()
    with pytest.raises(EngineBusy):
        engine.submit(ck, long_request(n=1))


async def test_a_request_the_model_cannot_run_is_refused_before_it_queues(engine, checkpoints):
    ck = checkpoints["gru"]
    with pytest.raises(UnknownCharactersError):
        engine.submit(ck, Request("分开\u2603", 10))
    with pytest.raises(ConstraintError):
        engine.submit(ck, Request("分开", 3, constraints=Constraints(lines=5)))
    assert engine.pending == 0 and engine.queued == 0 and not engine.jobs and not engine.schedulers


async def test_a_failing_request_fails_alone(engine, checkpoints):
    ck = checkpoints["gru"]
    # a start snapshot whose last character is past the vocabulary: the prefill raises
    broken = Request("分开", 10, start=Snapshot(ck.model.init_state(1), 10**6,
                                               torch.zeros(ck.config.vocab_size, dtype=torch.bool), []))
    good = engine.submit(ck, Request("你说", 10), stream=False)
    with pytest.raises(IndexError):
        await engine.complete(ck, broken)
    assert await good.wait() == generate(ck.model, ck.vocab, "你说", 10)
    assert engine.finished["error"] == 1 and engine.in_flight == 0


async def test_a_scheduler_fault_fails_the_running_requests_and_the_engine_keeps_serving(engine, checkpoints,
                                                                                     monkeypatch):
    from app.engine import Scheduler

    ck = checkpoints["gru"]
    original, faults = Scheduler.retire_stopped, []

    def faulty_once(self, posts):
        if not faults:
            faults.append(1)
            raise RuntimeError("injected scheduler fault")
        return original(self, posts)

    monkeypatch.setattr(Scheduler, "retire_stopped", faulty_once)
    with pytest.raises(RuntimeError, match="injected"):
        with anyio.fail_after(10):  # the fault must end the request, not leave it waiting
            await engine.complete(ck, Request("分开", 10))
    assert engine.finished["error"] == 1 and engine.in_flight == 0
    assert await engine.complete(ck, Request("你说", 10)) == generate(ck.model, ck.vocab, "你说", 10)


# Mixed requests for the batching tests: models, prefix lengths (some equal, so prefilled
# together), lengths, n, greedy and seeded sampling with every sampler setting, stop strings.
PREFIXES = ["分开", "你说", "我", "手中的铅笔", "窗外的燕子 在", "分开的爱 我不要\n"]
SAMPLERS = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9), SamplingParams(temperature=1.0, top_k=5),
            SamplingParams(temperature=0.7, repetition_penalty=1.3), SamplingParams(repetition_penalty=1.5)]


def mixed_requests(count: int) -> list[dict]:
    return [dict(model=("gru", "rnn")[i % 2 if i % 5 else 0], prefix=PREFIXES[i % len(PREFIXES)],
                 max_chars=(0, 7, 25, 60)[i % 4] if i % 7 else 80, params=SAMPLERS[i % len(SAMPLERS)],
                 stop=[("的",), ("\n", "我"), ()][i % 3], seed=i, n=1 + i % 3)
            for i in range(count)]


def alone(ck, request: dict):
    return generate(ck.model, ck.vocab, request["prefix"].replace("\n", " ") if ck.newlines == "space"
                    else request["prefix"], request["max_chars"], request["params"], request["stop"],
                    request["seed"], request["n"])


def as_request(ck, request: dict) -> Request:
    prefix = request["prefix"].replace("\n", " ") if ck.newlines == "space" else request["prefix"]
    return Request(prefix, request["max_chars"], request["params"], request["stop"], request["seed"], request["n"])


async def test_concurrent_mixed_requests_each_get_what_they_would_get_alone(checkpoints):
    engine = Engine(max_batch=12, max_queue=200, timeout_s=60)  # a small batch: requests join as others leave
    engine.start()
    requests = mixed_requests(24)
    streamed: dict[int, dict[int, str]] = {}
    completions = {}
    peak = 0

    async def consume(i, request):
        nonlocal peak
        ck = checkpoints[request["model"]]
        job = engine.submit(ck, as_request(ck, request), stream=i % 2 == 0)
        streamed[i] = {}
        async for delta in job:
            streamed[i][delta.index] = streamed[i].get(delta.index, "") + delta.text
            # each model's batch: a job whose other rows finished stays in flight, so in_flight may pass
            # max_batch for a moment while the batches themselves never do
            peak = max([peak, *(len(s.batch.rows) for s in list(engine.schedulers.values()))])
        completions[i] = job.completions

    try:
        async with anyio.create_task_group() as tg:
            for i, request in enumerate(requests):
                tg.start_soon(consume, i, request)
        for i, request in enumerate(requests):
            expected = alone(checkpoints[request["model"]], request)
            assert completions[i] == expected, f"request {i} differs from the same request alone"
            if i % 2 == 0:
                assert streamed[i] == {j: c.generated for j, c in enumerate(expected) if c.generated}
        assert 1 < peak <= 12  # no batch holds more than max_batch rows
        assert engine.in_flight == 0 and engine.queued == 0 and engine.pending == 0 and not engine.jobs
        assert all(not s.batch.rows and not s.active for s in engine.schedulers.values())
        assert engine.finished["completed"] == len(requests)
    finally:
        engine.stop()


async def test_a_stream_closed_mid_way_leaves_its_batch_mates_untouched(checkpoints):
    engine = Engine(max_batch=64, max_queue=0, timeout_s=60)
    engine.start()
    ck = checkpoints["gru"]
    try:
        doomed = engine.submit(ck, long_request(n=3))
        request = dict(prefix="你说", max_chars=300, params=SamplingParams(temperature=0.9, top_p=0.9), stop=(),
                       seed=5, n=2)
        mate = engine.submit(ck, as_request(ck, request), stream=False)
        deltas = aiter(doomed)
        await anext(deltas)
        await wait_until(lambda: engine.in_flight == 5)
        await deltas.aclose()
        await wait_until(lambda: engine.in_flight <= 2)
        assert await mate.wait() == alone(ck, request)
        assert engine.finished["cancelled"] == 1 and engine.finished["completed"] == 1
        assert engine.in_flight == 0 and not engine.jobs
    finally:
        engine.stop()


async def test_only_the_scheduler_threads_get_torch_intra_op_threads(checkpoints, monkeypatch):
    # Each thread that runs torch with several intra-op threads keeps its own OpenMP team; with more
    # team threads than cores, libgomp stops spin-waiting and every parallel region pays a sleep and a
    # wake-up (measured: a 200-character generation 40 ms instead of 27 ms in a second thread).
    ck = checkpoints["gru"]
    seen_in_forward = []
    forward = ck.model.forward

    def recording_forward(*args, **kwargs):
        seen_in_forward.append(torch.get_num_threads())
        return forward(*args, **kwargs)

    monkeypatch.setattr(ck.model, "forward", recording_forward)
    engine = Engine(threads=3)
    engine.start()
    try:
        await engine.complete(ck, Request("分开", 5))
        assert set(seen_in_forward) == {3}
        assert await engine.run(torch.get_num_threads) == 1
    finally:
        engine.stop()
