"""Liveness, readiness, Prometheus metrics, the OpenAPI page and the settings."""

from __future__ import annotations

import json

import httpx
import pytest
from api_helpers import assert_error, metric

from app.main import create_app
from app.settings import Settings
from model_store.sampling import LYRIC_DEFAULTS

pytestmark = pytest.mark.anyio


async def test_healthz(client):
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_readyz_names_the_models_and_device(client):
    r = await client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "default": "gru", "models": ["gru", "rnn"], "device": "cpu"}


async def test_before_startup_alive_but_not_ready(settings):
    app = create_app(settings)  # lifespan not run: nothing loaded
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        assert (await client.get("/healthz")).status_code == 200
        r = await client.get("/readyz")
        assert_error(r, 503, "not_ready")
        assert r.headers["retry-after"] == "1"
        assert_error(await client.post("/generate", json={"prefix": "分开"}), 503, "not_ready")
        assert_error(await client.get("/models"), 503, "not_ready")


async def test_after_shutdown_not_ready(settings):
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        pass
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        assert_error(await client.get("/readyz"), 503, "not_ready")


async def test_metrics_count_requests_latency_and_characters(client):
    await client.post("/generate", json={"prefix": "分开", "max_chars": 20})
    await client.post("/generate", json={"prefix": "分开", "max_chars": 5, "n": 2, "stream": True})
    await client.post("/generate", json={"prefix": ""})
    await client.post("/perplexity", json={"text": "分开的爱"})
    await client.get("/no/such/path")
    await client.post("/generate", content=b"{}" + b" " * 2_000_000, headers={"content-type": "application/json"})
    r = await client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric(text, "lyrics_http_requests_total", route="/generate", method="POST", status="200") == 2
    assert metric(text, "lyrics_http_requests_total", route="/generate", method="POST", status="422") == 1
    assert metric(text, "lyrics_http_requests_total", route="/generate", method="POST", status="413") == 1
    assert metric(text, "lyrics_http_requests_total", route="/perplexity", method="POST", status="200") == 1
    assert metric(text, "lyrics_http_requests_total", route="other", method="GET", status="404") == 1
    assert metric(text, "lyrics_http_request_duration_seconds_count", route="/generate", method="POST") == 4
    assert metric(text, "lyrics_http_request_duration_seconds_bucket", route="/generate", method="POST",
                  le="+Inf") == 4
    assert metric(text, "lyrics_generated_chars_total", model="gru") == 30
    assert metric(text, "lyrics_scored_chars_total", model="gru") == 3
    assert metric(text, "lyrics_generations_total", outcome="completed") == 2
    assert metric(text, "lyrics_inflight_sequences") == 0
    assert metric(text, "lyrics_queued_requests") == 0
    assert metric(text, "lyrics_models_loaded") == 2


async def test_each_app_has_its_own_metrics(make_client, settings, client):
    async with make_client(settings) as (_, other):
        await other.post("/generate", json={"prefix": "分开", "max_chars": 3})
        assert metric((await other.get("/metrics")).text, "lyrics_generated_chars_total", model="gru") == 3
        assert metric((await client.get("/metrics")).text, "lyrics_generated_chars_total", model="gru") == 0


async def test_the_docs_page_loads_swagger_ui_from_the_service_not_a_cdn(client):
    page = (await client.get("/docs")).text
    assert "cdn" not in page.lower() and "https://" not in page
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"/docs-static/{asset}" in page
        r = await client.get(f"/docs-static/{asset}")
        assert r.status_code == 200 and len(r.content) > 10_000


async def test_docs_and_openapi_document_every_field_with_defaults(client):
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = (await client.get("/openapi.json")).json()
    assert {"/generate", "/perplexity", "/models", "/models/{name}", "/healthz", "/readyz", "/metrics"} <= set(
        spec["paths"])
    schema = spec["components"]["schemas"]["GenerateRequest"]
    props = schema["properties"]
    assert set(props) == {"prefix", "model", "max_chars", "temperature", "top_k", "top_p", "repetition_penalty",
                          "no_repeat_ngram", "no_blank_runs", "max_char_run", "min_line_chars", "best_of", "best_of_chars",
                          "stop", "seed", "n", "stream", "unknown", "return_state", "state", "constraints", "logprobs"}
    defaults = {"max_chars": 50, "top_k": 0, "repetition_penalty": 1.0, "stop": [], "seed": None, "n": 1,
                "stream": False, "unknown": "error", "return_state": False, "logprobs": None,
                **dict.fromkeys(LYRIC_DEFAULTS)}
    assert {k: props[k].get("default") for k in defaults} == defaults  # null defaults are left out
    assert all(props[k].get("description") for k in props), "every field is described"
    # the decoding fields default to null ("not given"): their descriptions say what omitted means
    for field, value in LYRIC_DEFAULTS.items():
        assert f"omitted: {json.dumps(value)}" in props[field]["description"].lower(), field
    for field, off in {"top_p": "1", "no_repeat_ngram": "0", "no_blank_runs": "false", "best_of": "1",
                       "max_char_run": "0", "min_line_chars": "0"}.items():
        assert f"{off} when greedy" in props[field]["description"], field
    assert schema["examples"][0] == {"prefix": "分开"}
    ranges = {k: next(a for a in props[k]["anyOf"] if a["type"] != "null") for k in ("top_p", "temperature")}
    assert ranges["top_p"]["exclusiveMinimum"] == 0 and ranges["temperature"]["maximum"] == 100
    generate = spec["paths"]["/generate"]["post"]
    assert "text/event-stream" in generate["responses"]["200"]["content"]
    assert "data: [DONE]" in generate["description"]
    for status in ("404", "422", "503"):
        assert generate["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert all(spec["components"]["schemas"]["PerplexityRequest"]["properties"][k].get("description")
               for k in ("text", "model", "unknown"))


def test_settings_come_from_lyrics_environment_variables(monkeypatch, tmp_path):
    for name, value in {"MODEL_DIR": str(tmp_path), "DEVICE": "cpu", "DEFAULT_MODEL": "gru", "HOST": "0.0.0.0",
                        "PORT": "9001", "MAX_PREFIX_CHARS": "10", "MAX_NEW_CHARS": "20", "MAX_N": "3",
                        "MAX_BODY_BYTES": "4096", "MAX_TEXTS": "4", "MAX_TEXT_CHARS": "99",
                        "REQUEST_TIMEOUT_S": "2.5", "LOG_LEVEL": "DEBUG", "WORKERS": "2", "MAX_QUEUE": "5"}.items():
        monkeypatch.setenv(f"LYRICS_{name}", value)
    s = Settings()
    assert (s.model_dir, s.device, s.default_model, s.host, s.port) == (tmp_path, "cpu", "gru", "0.0.0.0", 9001)
    assert (s.max_prefix_chars, s.max_new_chars, s.max_n, s.max_body_bytes, s.max_texts, s.max_text_chars) == (
        10, 20, 3, 4096, 4, 99)
    assert (s.request_timeout_s, s.log_level, s.workers, s.max_queue) == (2.5, "debug", 2, 5)


def test_settings_defaults(monkeypatch):
    from model_store.registry import BUNDLED_DIR

    for name in list(__import__("os").environ):
        if name.startswith("LYRICS_"):
            monkeypatch.delenv(name)
    s = Settings()
    assert (s.model_dir, s.device, s.default_model, s.host, s.port) == (BUNDLED_DIR, "auto", None, "127.0.0.1", 8000)


PLAYGROUND_IDS = ("model", "prefix", "max-chars", "temperature", "top-p", "seed", "generate", "stop", "output", "error",
                  "score-text", "score", "score-result")


async def test_the_root_serves_the_self_contained_playground(client):
    r = await client.get("/", follow_redirects=False)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "http://" not in page and "https://" not in page and "//cdn" not in page.lower()
    for element in PLAYGROUND_IDS:
        assert f'id="{element}"' in page, element
    assert "Noto Sans CJK SC" in page and "pre-wrap" in page
    assert "/" not in (await client.get("/openapi.json")).json()["paths"]


async def test_every_answer_carries_a_request_id_the_client_may_choose(client):
    first, second = (await client.get("/healthz")), (await client.get("/healthz"))
    assert len(first.headers["x-request-id"]) == 32 and first.headers["x-request-id"] != second.headers["x-request-id"]
    chosen = await client.get("/models", headers={"X-Request-ID": "trace-42.a:b"})
    assert chosen.headers["x-request-id"] == "trace-42.a:b"
    odd = await client.get("/models", headers={"X-Request-ID": "no spaces or\tcontrol"})
    assert odd.headers["x-request-id"] != "no spaces or\tcontrol" and len(odd.headers["x-request-id"]) == 32
    error = await client.post("/generate", json={"prefix": "分开", "model": "nope"})
    assert error.status_code == 404 and "x-request-id" in error.headers


async def test_metrics_show_queue_wait_first_character_speed_occupancy_and_errors_by_type(client):
    for _ in range(2):
        assert (await client.post("/generate", json={"prefix": "分开", "max_chars": 20, "n": 2, "best_of": 1})
                ).status_code == 200
    await client.post("/generate", json={"prefix": "分开", "model": "nope"})
    await client.post("/generate", json={"prefix": "分开", "max_chars": -1})
    text = (await client.get("/metrics")).text
    assert metric(text, "lyrics_queue_wait_seconds_count", model="gru") == 2
    assert metric(text, "lyrics_time_to_first_char_seconds_count", model="gru") == 2
    assert metric(text, "lyrics_time_to_first_char_seconds_sum", model="gru") >= metric(
        text, "lyrics_queue_wait_seconds_sum", model="gru")  # the first character comes after joining the batch
    assert metric(text, "lyrics_generation_chars_per_second_count", model="gru") == 2
    assert metric(text, "lyrics_batch_rows_count", model="gru") >= 20  # a step per character
    assert metric(text, "lyrics_batch_rows_sum", model="gru") >= 2 * 20 * 2  # two rows each step at least
    assert metric(text, "lyrics_errors_total", type="model_not_found") == 1
    assert metric(text, "lyrics_errors_total", type="validation_error") == 1
