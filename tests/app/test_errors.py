"""One error shape for every 4xx and 5xx, and no input that makes the service fail."""

from __future__ import annotations

import json
from functools import partial

import anyio
import pytest
from api_helpers import assert_error
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from app.engine import EngineBusy, EngineStopped, EngineTimeout
from app.errors import engine_error
from app.settings import Settings

pytestmark = pytest.mark.anyio
JSON = {"content-type": "application/json"}


async def test_unknown_path_is_404(client):
    error = assert_error(await client.get("/nope"), 404, "not_found")
    assert "/nope" in error["message"]


async def test_wrong_method_is_405_with_allow(client):
    r = await client.get("/generate")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"
    assert_error(await client.delete("/models"), 405, "method_not_allowed")


async def test_body_over_the_limit_is_413_by_content_length(make_client, model_dir):
    async with make_client(Settings(model_dir=model_dir, device="cpu", max_body_bytes=2048)) as (_, client):
        ok = await client.post("/generate", json={"prefix": "分开", "max_chars": 1, "stop": [" " * 10] * 8})
        assert ok.status_code == 200
        error = assert_error(await client.post("/generate", json={"prefix": "分" * 1000}), 413, "payload_too_large")
        assert "2048" in error["message"]
        assert_error(await client.post("/perplexity", json={"text": "分开" * 1000}), 413, "payload_too_large")


async def test_streamed_body_over_the_limit_is_413(make_client, model_dir):
    async def chunks():  # no Content-Length: chunked transfer
        yield b'{"prefix": "'
        for _ in range(10):
            yield b"a" * 1024
        yield b'"}'

    async with make_client(Settings(model_dir=model_dir, device="cpu", max_body_bytes=4096)) as (_, client):
        assert_error(await client.post("/generate", content=chunks(), headers=JSON), 413, "payload_too_large")


async def test_non_json_content_type_is_415(client):
    error = assert_error(await client.post("/generate", content="prefix=分开",
                                           headers={"content-type": "application/x-www-form-urlencoded"}),
                         415, "unsupported_media_type")
    assert "application/json" in error["message"]
    assert_error(await client.post("/perplexity", content="分开的爱", headers={"content-type": "text/plain"}), 415)


@pytest.mark.parametrize("content", [b"{bad json", b"{\"prefix\": }", b"\"just a string\"", b"[1, 2]", b"null",
                                     b"42", b"", b"{\"prefix\": \"\\ud800\"}"])
async def test_malformed_bodies_are_4xx(client, content):
    r = await client.post("/generate", content=content, headers=JSON)
    assert 400 <= r.status_code < 500
    assert_error(r, r.status_code)


async def test_invalid_json_says_where(client):
    error = assert_error(await client.post("/generate", content=b'{"prefix": }', headers=JSON), 422)
    assert "not valid JSON" in error["message"] and error["details"][0]["loc"] == ["body"]


@pytest.mark.parametrize("content", [b"\xff\xfe{}", b"{\"max_chars\": 1" + b"0" * 5000 + b", \"prefix\": \"a\"}",
                                     b"[" * 100_000 + b"]" * 100_000])
async def test_undecodable_bodies_are_400_or_422(client, content):
    r = await client.post("/generate", content=content, headers=JSON)
    assert r.status_code in (400, 413, 422)
    assert_error(r, r.status_code)


async def test_unexpected_failures_are_500_without_a_trace(app_client):
    app, client = app_client

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internals")

    r = await client.get("/boom")
    assert_error(r, 500, "internal_error")
    assert "secret" not in r.text


class SyncClient:
    """The in-process async client driven from plain functions (hypothesis runs those)."""

    def __init__(self, portal, client):
        self.portal, self.client = portal, client

    def post(self, path, **kwargs):
        return self.portal.call(partial(self.client.post, path, **kwargs))


@pytest.fixture(scope="module")
def sync_client(model_dir, make_client):
    settings = Settings(model_dir=model_dir, device="cpu", max_new_chars=20, max_n=2, max_prefix_chars=50,
                        max_texts=3, max_text_chars=50, max_body_bytes=4096)
    with anyio.from_thread.start_blocking_portal() as portal:
        with portal.wrap_async_context_manager(make_client(settings)) as (_, client):
            yield SyncClient(portal, client)


values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                  max_size=4), max_leaves=10)
GENERATE_FIELDS = ["prefix", "model", "max_chars", "temperature", "top_k", "top_p", "repetition_penalty", "stop",
                   "seed", "n", "stream", "unknown"]
generate_bodies = st.dictionaries(st.sampled_from(GENERATE_FIELDS + ["other"]), values, max_size=8) | \
    st.fixed_dictionaries({"prefix": st.text(alphabet="分开的爱我不要\nxy ", max_size=20)},
    optional={"max_chars": st.integers(-5, 25), "temperature": st.floats(-1, 3), "top_k": st.integers(-2, 60),
              "top_p": st.floats(-0.5, 1.5), "repetition_penalty": st.floats(-1, 5), "n": st.integers(-1, 3),
              "seed": st.integers(-5, 2**64), "stop": st.lists(st.text(max_size=3), max_size=3),
              "stream": st.booleans(), "unknown": st.sampled_from(["error", "skip", "x"]),
              "model": st.sampled_from(["gru", "rnn", "x", ""])})
perplexity_bodies = st.dictionaries(st.sampled_from(["text", "model", "unknown", "x"]), values, max_size=4) | \
    st.fixed_dictionaries({"text": st.text(alphabet="分开的爱xy\n", max_size=12) | st.lists(
        st.text(alphabet="分开的爱xy\n", max_size=6), max_size=4)},
        optional={"unknown": st.sampled_from(["error", "skip"]), "model": st.sampled_from(["gru", "rnn", "x"])})


def fuzz(examples: int):
    return hypothesis_settings(max_examples=examples, deadline=None, database=None,
                               suppress_health_check=[HealthCheck.function_scoped_fixture])


def check_answer(r):
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert_error(r, r.status_code)


@fuzz(150)
@given(body=generate_bodies)
def test_no_generate_body_makes_a_500(sync_client, body):
    r = sync_client.post("/generate", content=json.dumps(body), headers=JSON)
    check_answer(r)
    if r.status_code == 200 and not body.get("stream"):
        assert len(r.json()["choices"]) == body.get("n", 1)


valid_generate_bodies = st.fixed_dictionaries(
    {"prefix": st.text(alphabet="分开的爱我不要\n ", min_size=1, max_size=20)},
    optional={"max_chars": st.integers(0, 20), "temperature": st.floats(0, 100), "top_k": st.integers(0, 10**6),
              "top_p": st.floats(0, 1, exclude_min=True), "repetition_penalty": st.floats(0, 100, exclude_min=True),
              "n": st.integers(1, 2), "seed": st.integers(0, 2**53 - 1), "stream": st.booleans(),
              "stop": st.lists(st.text(max_size=3), max_size=3), "model": st.sampled_from(["gru", "rnn"])})


@fuzz(60)
@given(body=valid_generate_bodies)
def test_every_valid_generate_body_is_answered(sync_client, body):
    r = sync_client.post("/generate", content=json.dumps(body), headers=JSON)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        answer = r.json()
        assert len(answer["choices"]) == body.get("n", 1)
        assert all(len(c["generated"]) <= body.get("max_chars", 50) for c in answer["choices"])


@fuzz(100)
@given(body=perplexity_bodies)
def test_no_perplexity_body_makes_a_500(sync_client, body):
    check_answer(sync_client.post("/perplexity", content=json.dumps(body), headers=JSON))


@fuzz(60)
@given(raw=st.binary(max_size=200), content_type=st.sampled_from(["application/json", "text/plain", "", "x/y"]),
       path=st.sampled_from(["/generate", "/perplexity", "/models", "/models/gru"]))
def test_no_raw_bytes_make_a_500(sync_client, raw, content_type, path):
    check_answer(sync_client.post(path, content=raw, headers={"content-type": content_type} if content_type else {}))


@pytest.mark.parametrize("error, status, type, retry", [
    (EngineBusy("64 sequences are running or waiting"), 503, "busy", "1"),
    (EngineTimeout("generation stopped after 30 s"), 504, "timeout", None),
    (EngineStopped("the server is shutting down"), 503, "unavailable", None),
    (RuntimeError("a bug"), 500, "internal_error", None),
])
def test_one_mapping_from_the_engines_errors_to_answers(error, status, type, retry):
    """Every route (/generate, /v1/completions, /compare, /perplexity) raises what engine_error says."""
    answer = engine_error(error)
    assert (answer.status, answer.type, (answer.headers or {}).get("Retry-After")) == (status, type, retry)
    assert str(error) in answer.message or status == 500  # a bug's text stays in the log, not the answer
