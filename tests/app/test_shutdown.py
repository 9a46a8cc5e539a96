"""Graceful shutdown: on SIGTERM running generations finish, new work is refused, the process exits 0.

Two layers. `Engine.drain` (in process): new submits get EngineBusy (503) while admitted work runs
to its end, up to the drain timeout; then `stop()` ends the rest. A real `lyrics serve`: uvicorn
closes its listener at SIGTERM, so a new request finds the connection refused (it never reaches
the app, so it is not a 503), and the streams in flight get their complete answers.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import anyio
import httpx
import pytest
from api_helpers import free_port, read_tail, start_server, stream_parts, wait_ready
from conftest import CORPUS

from app.engine import Engine, EngineBusy
from model_store.generate import Request
from model_store.sampling import SamplingParams
from training.train import TrainConfig, train

LYRICS = str(Path(sys.executable).parent / "lyrics")


def sampled(max_chars: int) -> Request:
    return Request("分开", max_chars, SamplingParams(temperature=1.0), seed=0)


@pytest.mark.anyio
async def test_drain_refuses_new_work_and_lets_running_work_finish(checkpoints):
    engine = Engine(max_batch=4, max_queue=4, timeout_s=30)
    engine.start()
    ck = checkpoints["gru"]
    try:
        jobs = [engine.submit(ck, sampled(400)) for _ in range(3)]
        drained = []
        async with anyio.create_task_group() as tg:
            async def drain():
                drained.append(await engine.drain(30))
            tg.start_soon(drain)
            await anyio.sleep(0.01)
            with pytest.raises(EngineBusy, match="shutting down"):
                engine.submit(ck, sampled(10))
            with pytest.raises(EngineBusy):
                await engine.run(sum, [1])
            completions = [await job.wait() for job in jobs]
        assert drained == [True] and engine.pending == 0
        assert all(len(c[0].generated) == 400 and c[0].finish_reason == "length" for c in completions)
        assert engine.finished["completed"] == 3 and engine.finished["cancelled"] == 0
    finally:
        engine.stop()


@pytest.mark.anyio
async def test_drain_timeout_then_stop_cancels_what_is_left(checkpoints):
    engine = Engine(max_batch=4, max_queue=4, timeout_s=30)
    engine.start()
    job = engine.submit(checkpoints["gru"], sampled(1_000_000))
    t0 = time.monotonic()
    assert await engine.drain(0.2) is False
    assert 0.2 <= time.monotonic() - t0 < 2.0
    engine.stop()
    completions = await job.wait()
    assert len(completions[0].generated) < 1_000_000 and engine.finished["cancelled"] == 1


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shutdown")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    models = root / "models"
    train(TrainConfig(corpus=str(corpus), cell="rnn", out=str(models / "rnn.safetensors"), hidden_size=16,
                      embed_size=0, epochs=1, batch_size=4, num_steps=8, seed=0, progress=False, sample_every=0),
          log=lambda _: None)
    for by_product in models.glob("*.*"):
        if not by_product.name.endswith(".safetensors"):
            by_product.unlink()
    return models


STREAMS, MAX_CHARS, DRAIN_S = 3, 6000, 20


def test_sigterm_finishes_streams_in_flight_refuses_new_requests_and_exits_0(small_model_dir, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LYRICS_")}
    env.update(LYRICS_MAX_NEW_CHARS=str(MAX_CHARS), LYRICS_DRAIN_TIMEOUT_S=str(DRAIN_S), LYRICS_TORCH_THREADS="1")
    process = start_server([LYRICS, "serve", "--port", str(port), "--model-dir", str(small_model_dir),
                            "--device", "cpu", "--host", "127.0.0.1"], env, log)
    base_url = f"http://127.0.0.1:{port}"
    results: list = [None] * STREAMS
    first_chunk = [threading.Event() for _ in range(STREAMS)]

    def stream(i: int) -> None:
        # one row per stream (best_of 1): the drain timings above are sized for three rows
        request = {"prefix": "分开", "max_chars": MAX_CHARS, "temperature": 1.0, "seed": i, "stream": True, "best_of": 1}
        try:
            with httpx.Client(base_url=base_url, timeout=60) as client, \
                    client.stream("POST", "/generate", json=request) as response:
                text = ""
                for chunk in response.iter_text():
                    text += chunk
                    first_chunk[i].set()
                results[i] = (response.status_code, text, time.monotonic())
        except Exception as e:  # recorded, asserted below
            results[i] = (None, repr(e), time.monotonic())
            first_chunk[i].set()

    try:
        wait_ready(base_url, process, log)
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        for event in first_chunk:
            assert event.wait(30)
        sigterm = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # draining: the listener stays open, new work and the readiness probe get 503, liveness stays 200
        refused = httpx.post(f"{base_url}/generate", json={"prefix": "分开", "max_chars": 5}, timeout=5)
        refused_at = time.monotonic() - sigterm
        assert refused.status_code == 503 and "Retry-After" in refused.headers, refused.text
        assert refused.json()["error"]["message"] == "the server is shutting down"
        assert httpx.get(f"{base_url}/readyz", timeout=5).status_code == 503
        assert httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200
        still_running = process.poll() is None
        for t in threads:
            t.join(DRAIN_S + 10)
        rc = process.wait(DRAIN_S + 10)
        exited = time.monotonic() - sigterm
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.log_file.close()
    finished = [r[2] - sigterm for r in results if r is not None]
    print(f"\nSIGTERM: new request answered 503 at +{refused_at:.2f} s (server still running: {still_running}); "
          f"streams finished at +{', +'.join(f'{t:.2f}' for t in finished)} s; exit {rc} at +{exited:.2f} s")
    assert still_running, "the server exited before the streams had finished"
    for status, text, _ in results:
        assert status == 200, text
        chunks, final, events = stream_parts(text)
        assert final is not None, text[-500:]
        assert final["finish_reason"] == "length" and final["usage"]["generated_chars"] == MAX_CHARS
        assert chunks[0] == final["generated"] and events[-1] == ("message", "[DONE]")
    assert rc == 0, read_tail(log)
    assert exited < DRAIN_S
    assert "drain timeout" not in read_tail(log)
