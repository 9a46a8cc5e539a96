"""The OpenAI-compatible API, driven by the real `openai` client against a real `lyrics serve`."""

from __future__ import annotations

import json
import threading
from itertools import pairwise

import httpx
import openai
import pytest
from api_helpers import serving

from model_store.generate import generate

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("openai") / "server.log"
    with serving(model_dir, log, LYRICS_API_KEYS=KEY, LYRICS_DEFAULT_MODEL="gru") as (base_url, _):
        yield base_url


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def test_a_plain_completion_is_the_completion_alone_with_usage_in_characters(client, checkpoints):
    answer = client.completions.create(model="gru", prompt="分开", max_tokens=20, temperature=0)
    [expected] = generate(checkpoints["gru"].model, checkpoints["gru"].vocab, "分开", 20)
    assert answer.object == "text_completion" and answer.id.startswith("cmpl-") and answer.model == "gru"
    assert answer.created > 1_700_000_000
    [c] = answer.choices
    assert (c.index, c.text, c.finish_reason, c.logprobs) == (0, expected.generated, "length", None)
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (2, 20, 22)


def test_defaults_are_the_lyric_defaults_and_sixteen_characters(client, http):
    answer = client.completions.create(model="gru", prompt="分开", seed=11)
    same = http.post("/generate", json={"prefix": "分开", "max_chars": 16, "seed": 11}).json()
    assert answer.choices[0].text == same["generated"] and len(answer.choices[0].text) <= 16


def test_n_choices_with_a_seed_reproduce_and_match_generate(client, http):
    first = client.completions.create(model="gru", prompt="分开", max_tokens=15, temperature=0.9, n=3, seed=7)
    again = client.completions.create(model="gru", prompt="分开", max_tokens=15, temperature=0.9, n=3, seed=7)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    ours = http.post("/generate", json={"prefix": "分开", "max_chars": 15, "temperature": 0.9, "n": 3,
                                        "seed": 7}).json()
    assert [c.text for c in first.choices] == [c["generated"] for c in ours["choices"]]
    assert len({c.text for c in first.choices}) > 1


def test_a_list_of_prompts_gives_each_its_n_choices_in_order(client, checkpoints):
    answer = client.completions.create(model="gru", prompt=["分开", "手中的"], max_tokens=10, temperature=0, n=2)
    ck = checkpoints["gru"]
    expected = [generate(ck.model, ck.vocab, p, 10)[0].generated for p in ("分开", "手中的")]
    assert [(c.index, c.text) for c in answer.choices] == [(0, expected[0]), (1, expected[0]),
                                                            (2, expected[1]), (3, expected[1])]
    assert answer.usage.prompt_tokens == 5 and answer.usage.completion_tokens == 40


def test_stop_takes_a_string_or_a_list(client, checkpoints):
    ck = checkpoints["gru"]
    [free] = generate(ck.model, ck.vocab, "分开", 40)
    stop = free.generated[5:7]
    for given in (stop, [stop, "不会出现的字串"]):
        [c] = client.completions.create(model="gru", prompt="分开", max_tokens=40, temperature=0, stop=given).choices
        assert c.finish_reason == "stop" and c.text == free.generated[:free.generated.index(stop)]


def test_echo_repeats_the_prompt(client):
    [c] = client.completions.create(model="gru", prompt="分开", max_tokens=5, temperature=0, echo=True).choices
    assert c.text.startswith("分开") and len(c.text) == 7


def test_stream_chunks_add_up_to_the_answer_and_each_choice_ends_with_its_finish_reason(client):
    request = dict(model="gru", prompt=["分开", "手中的"], max_tokens=30, temperature=0.8, n=2, seed=3)
    whole = client.completions.create(**request)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(**request, stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "text_completion" and chunk.id.startswith("cmpl-")
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            assert c.index not in finish  # nothing after a choice's end
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finish == {c.index: c.finish_reason for c in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.prompt_tokens == 5


def test_logprobs_equal_perplexitys_per_character_numbers(client, http):
    [c] = client.completions.create(model="gru", prompt="分开", max_tokens=25, temperature=0.8, seed=5,
                                    logprobs=3).choices
    lp = c.logprobs
    assert "".join(lp.tokens) == c.text and len(lp.token_logprobs) == 25
    assert lp.text_offset == list(range(2, 27))
    scored = http.post("/perplexity", json={"text": "分开" + c.text, "model": "gru", "per_char": True}).json()
    assert lp.token_logprobs == pytest.approx([-x["nll"] for x in scored["per_char"][2:]], abs=1e-4)
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) >= value - 1e-6
        if token in top:
            assert top[token] == pytest.approx(value, abs=1e-6)


def test_echo_with_no_new_tokens_scores_the_prompt_as_perplexity_does(client, http):
    text = "分开的爱 我不要"
    [c] = client.completions.create(model="gru", prompt=text, max_tokens=0, echo=True, logprobs=1).choices
    assert c.text == text and c.logprobs.tokens == list(text) and c.logprobs.text_offset == list(range(len(text)))
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    scored = http.post("/perplexity", json={"text": text, "model": "gru", "per_char": True}).json()
    assert c.logprobs.token_logprobs[1:] == pytest.approx([-x["nll"] for x in scored["per_char"][1:]], abs=1e-4)


def test_streamed_logprobs_match_the_answer(client):
    request = dict(model="gru", prompt="分开", max_tokens=12, temperature=0.8, seed=9, logprobs=2)
    [whole] = client.completions.create(**request).choices
    tokens, values, offsets = [], [], []
    for chunk in client.completions.create(**request, stream=True):
        for c in chunk.choices:
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert values == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6)


def test_project_fields_work_as_extensions(client):
    [c] = client.completions.create(model="gru", prompt="分开", max_tokens=21, temperature=0.8, seed=1,
                                    extra_body={"top_k": 5, "no_repeat_ngram": 3, "max_char_run": 1,
                                                "constraints": {"lines": 3, "line_lengths": 6}}).choices
    assert [len(line) for line in c.text.split("\n")[:3]] == [6, 6, 6]
    assert not any(a == b for a, b in pairwise(c.text)), c.text
    [c] = client.completions.create(model="gru", prompt="分开", max_tokens=60, temperature=1.0, seed=1,
                                    extra_body={"min_line_chars": 9}).choices
    lines = ("分开" + c.text).split("\n")[:-1]
    assert lines and min(len(line) for line in lines) >= 9, c.text


def test_models_list_in_the_openai_shape(client, http):
    models = client.models.list()
    assert sorted(m.id for m in models.data) == ["gru", "rnn"]
    assert all(m.object == "model" and m.owned_by == "lyrics-rnn" and m.created > 0 for m in models.data)
    assert client.models.retrieve("rnn").id == "rnn"
    assert http.get("/v1/models").json()["object"] == "list"


def error_of(excinfo) -> dict:
    return excinfo.value.body if isinstance(excinfo.value.body, dict) and "message" in excinfo.value.body \
        else excinfo.value.response.json()["error"]


def test_errors_take_the_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="分开")
    assert error_of(e)["code"] == "model_not_found" and error_of(e)["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="gru", prompt="分开", max_tokens=-1)
    assert error_of(e)["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="gru", prompt="分开☃")
    assert error_of(e)["param"] == "prompt" and "☃" in error_of(e)["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="gru", prompt="")
    assert error_of(e)["param"] == "prompt" and error_of(e)["code"] == "empty_prefix"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="gru", prompt="分开", frequency_penalty=0.5)
    assert error_of(e)["param"] == "frequency_penalty"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="gru", prompt="分开", extra_body={"no_such_field": 1})
    assert error_of(e)["param"] == "no_such_field"
    with openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError) as e:
            stranger.completions.create(model="gru", prompt="分开")
    assert error_of(e)["type"] == "authentication_error"


def test_langchain_style_requests_with_neutral_penalties_are_accepted(http):
    body = {"model": "gru", "prompt": ["分开"], "max_tokens": 8, "temperature": 0.7, "top_p": 1, "n": 1,
            "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "best_of": 1, "user": "u1"}
    answer = http.post("/v1/completions", json=body)
    assert answer.status_code == 200 and len(answer.json()["choices"][0]["text"]) == 8


def test_a_full_queue_is_429_with_retry_after(model_dir, tmp_path):
    with serving(model_dir, tmp_path / "busy.log", LYRICS_MAX_BATCH="1", LYRICS_MAX_QUEUE="0",
                 LYRICS_MAX_NEW_CHARS="200000") as (base_url, _):
        started, release = threading.Event(), threading.Event()

        def hold():  # one long stream occupies the only place until released
            body = {"model": "gru", "prompt": "分开", "max_tokens": 200000, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=60) as r:
                for _ in r.iter_lines():
                    started.set()
                    if release.is_set():
                        break

        holder = threading.Thread(target=hold)
        holder.start()
        assert started.wait(30)
        with openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0) as c:
            with pytest.raises(openai.RateLimitError) as e:
                c.completions.create(model="gru", prompt="分开", max_tokens=5)
        assert e.value.response.headers["retry-after"] == "1"
        release.set()
        holder.join(30)
        assert error_of(e)["type"] == "rate_limit_error" and error_of(e)["code"] == "busy"


def test_the_openapi_schema_documents_the_v1_routes(http):
    schema = http.get("/openapi.json").json()
    assert {"/v1/completions", "/v1/models", "/v1/models/{model}"} <= set(schema["paths"])
    body = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "logprobs", "echo", "stop", "stream", "seed", "n", "top_k"} <= set(body)
    assert json.dumps(schema)  # serialisable
