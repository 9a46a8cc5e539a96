"""A real server: `lyrics serve` (uvicorn) on a free loopback port, driven over TCP with httpx."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from api_helpers import (
    LYRICS,
    assert_error,
    clean_env,
    free_port,
    metric,
    read_tail,
    serving,
    start_server,
    stop_server,
    stream_parts,
    wait_ready,
)

from model_store import kernels
from model_store.generate import generate
from model_store.registry import BUNDLED_DIR, checkpoint_paths
from model_store.sampling import decoding
from model_store.scoring import score_text


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """`lyrics serve` on the test models, options from the command line and limits from LYRICS_*."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serving(model_dir, log, LYRICS_MAX_NEW_CHARS="100000", LYRICS_MAX_BODY_BYTES="65536",
                 LYRICS_DEFAULT_MODEL="gru") as (base_url, _):
        yield base_url, log


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server[0], timeout=30) as client:
        yield client


def test_generate_greedy_equals_model_store(http, checkpoints):
    body = http.post("/generate", json={"prefix": "分开", "temperature": 0}).json()
    ck = checkpoints["gru"]
    assert body["text"] == generate(ck.model, ck.vocab, "分开", 50)[0].text
    assert body["finish_reason"] == "length" and body["usage"] == {"prompt_chars": 2, "generated_chars": 50}


def test_sampled_with_seed_is_reproducible_and_n_gives_choices(http, checkpoints):
    request = {"prefix": "你说", "temperature": 0.9, "top_k": 10, "seed": 42, "n": 3, "max_chars": 30}
    a, b = http.post("/generate", json=request).json(), http.post("/generate", json=request).json()
    assert a == b and len(a["choices"]) == 3 and [c["seed"] for c in a["choices"]] == [42, 43, 44]
    ck = checkpoints["gru"]
    expected = generate(ck.model, ck.vocab, "你说", 30, decoding(temperature=0.9, top_k=10), seed=42, n=3)
    assert [c["text"] for c in a["choices"]] == [c.text for c in expected]


def test_concurrent_requests_get_the_answers_they_would_get_alone(http, server):
    requests = [{"prefix": "分开", "temperature": 1.0, "seed": s, "max_chars": 40} for s in range(8)]
    alone = [http.post("/generate", json=r).json()["text"] for r in requests]

    def post(request):
        with httpx.Client(base_url=server[0], timeout=30) as client:
            return client.post("/generate", json=request).json()["text"]

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(post, requests)) == alone


def test_stream_arrives_as_events(http):
    request = {"prefix": "分开", "max_chars": 60, "temperature": 0.8, "seed": 3, "n": 2}
    plain = http.post("/generate", json=request).json()
    with http.stream("POST", "/generate", json={**request, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join(f"{line}\n" for line in r.iter_lines())
    chunks, final, events = stream_parts(text)
    assert chunks == {c["index"]: c["generated"] for c in plain["choices"]}
    assert final == plain and events[-1] == ("message", "[DONE]")


def test_a_disconnected_stream_stops_its_generation(http):
    before = metric(http.get("/metrics").text, "lyrics_generations_total", outcome="cancelled")
    request = {"prefix": "分开", "max_chars": 100_000, "n": 4, "temperature": 1.0, "seed": 1, "stream": True}
    with http.stream("POST", "/generate", json=request) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        # every continuation is best_of candidate sequences
        assert metric(http.get("/metrics").text, "lyrics_inflight_sequences") == 4 * decoding(1.0).best_of
    # leaving the block closes the connection mid-stream: the server must stop generating
    deadline = time.monotonic() + 10
    while True:
        text = http.get("/metrics").text
        if metric(text, "lyrics_inflight_sequences") == 0:
            break
        assert time.monotonic() < deadline, "the generation kept running after the client left"
        time.sleep(0.05)
    assert metric(text, "lyrics_generations_total", outcome="cancelled") == before + 1
    assert metric(text, "lyrics_generated_chars_total", model="gru") < 4 * 100_000


def test_perplexity(http, checkpoints):
    body = http.post("/perplexity", json={"text": ["分开的爱 我不要", "你说这一句"], "model": "rnn"}).json()
    ck = checkpoints["rnn"]
    assert body["model"] == "rnn" and len(body["results"]) == 2
    assert body["results"][1]["perplexity"] == pytest.approx(score_text(ck.model, ck.vocab, "你说这一句").perplexity,
                                                             rel=1e-6)


def test_models_health_and_metrics(http):
    models = http.get("/models").json()
    assert models["default"] == "gru" and [m["name"] for m in models["models"]] == ["gru", "rnn"]
    assert http.get("/models/rnn").json()["cell"] == "rnn"
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json()["models"] == ["gru", "rnn"]
    assert http.get("/docs").status_code == 200
    text = http.get("/metrics").text
    assert metric(text, "lyrics_http_requests_total", route="/models", method="GET", status="200") >= 1
    assert metric(text, "lyrics_models_loaded") == 2
    # the real server runs the kernels this process runs: none in the suite's run with LYRICS_KERNELS=0
    assert metric(text, "lyrics_kernels_info", build=kernels.build_name()) == 1


def test_errors(http):
    assert_error(http.post("/generate", json={"prefix": "分开", "model": "lstm"}), 404, "model_not_found")
    assert_error(http.post("/generate", json={"prefix": "分开ab"}), 422, "unknown_characters")
    assert_error(http.post("/generate", json={"prefix": "分开", "top_p": 2}), 422, "validation_error")
    assert_error(http.post("/generate", content=b"{oops", headers={"content-type": "application/json"}), 422)
    assert_error(http.post("/generate", content=b"prefix", headers={"content-type": "text/plain"}), 415)
    assert_error(http.get("/generate"), 405, "method_not_allowed")
    assert_error(http.post("/generate", json={"prefix": "分" * 40_000}), 413, "payload_too_large")
    assert_error(http.post("/perplexity", json={"text": "分"}), 422, "too_short")
    assert_error(http.get("/nowhere"), 404, "not_found")
    assert http.get("/healthz").status_code == 200  # still serving


def test_server_logs_loading_and_requests(http, server):
    http.get("/healthz")
    log = read_tail(server[1], 100_000)
    assert "loaded gru: gru 1x32" in log and "skipped broken.safetensors" in log
    assert '"GET /healthz" 200' in log


def test_refuses_to_start_without_models(tmp_path):
    log = tmp_path / "server.log"
    process = start_server([LYRICS, "serve", "--port", str(free_port()), "--model-dir", str(tmp_path / "none")],
                           clean_env(), log)
    try:
        assert process.wait(60) == 3
    finally:
        stop_server(process)
    assert "cannot start: no model to serve" in read_tail(log, 100_000)


def test_serve_as_make_run_does_on_the_bundled_model(tmp_path):
    """`make run` is `lyrics serve` with the default environment: the bundled models on 127.0.0.1."""
    assert checkpoint_paths(BUNDLED_DIR), f"no bundled model in {BUNDLED_DIR}: train them first (see README)"
    port, log = free_port(), tmp_path / "server.log"
    process = start_server([LYRICS, "serve"], clean_env(LYRICS_PORT=str(port)), log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, process, log, timeout=120)
        r = httpx.post(f"{base_url}/generate", json={"prefix": "分开"}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["text"].startswith("分开") and len(body["generated"]) == 50
        assert body["model"] == httpx.get(f"{base_url}/models").json()["default"]
        print(json.dumps(body, ensure_ascii=False))
    finally:
        stop_server(process)


def test_serve_rejects_invalid_settings_before_starting(monkeypatch, capsys):
    from lyrics_cli import main as cli_main

    monkeypatch.setenv("LYRICS_PORT", "not-a-port")
    assert cli_main(["serve"]) == 2
    assert "invalid LYRICS_* setting" in capsys.readouterr().err


def test_json_logs_carry_the_request_id_of_each_answer(model_dir, tmp_path):
    log = tmp_path / "json.log"
    with serving(model_dir, log, LYRICS_LOG_FORMAT="json") as (base_url, _):
        answer = httpx.post(f"{base_url}/generate", json={"prefix": "分开", "max_chars": 5}, timeout=30)
        assert answer.status_code == 200
        request_id = answer.headers["x-request-id"]
    lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    access = [e for e in lines if e.get("logger") == "app.access" and e.get("path") == "/generate"]
    assert [(e["request_id"], e["status"], e["method"]) for e in access] == [(request_id, 200, "POST")]
    assert {"level", "asctime", "message"} <= set(access[0])
    assert any(e.get("logger", "").startswith("uvicorn") for e in lines)  # uvicorn's own lines too
