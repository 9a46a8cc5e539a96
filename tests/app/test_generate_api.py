"""POST /generate in-process: every parameter, its default, its range, streaming and the limits."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest
from api_helpers import assert_error, stream_parts

from app.settings import Settings
from model_store.generate import generate
from model_store.sampling import LYRIC_DEFAULTS, decoding

pytestmark = pytest.mark.anyio


async def post(client, **body):
    return await client.post("/generate", json=body)


async def test_temperature_zero_is_greedy_50_characters_equal_to_model_store(client, checkpoints):
    r = await post(client, prefix="分开", temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    expected = generate(checkpoints["gru"].model, checkpoints["gru"].vocab, "分开", 50)[0]
    assert body["model"] == "gru" and body["prefix"] == "分开"
    assert body["text"] == expected.text and body["generated"] == expected.generated
    assert len(body["generated"]) == 50 and body["finish_reason"] == "length" and body["seed"] is None
    assert body["choices"] == [{"index": 0, "text": expected.text, "generated": expected.generated,
                                "finish_reason": "length", "seed": None}]
    assert body["usage"] == {"prompt_chars": 2, "generated_chars": 50}
    assert body["unknown_skipped"] == 0 and body["unknown_characters"] == []


async def test_omitted_decoding_fields_are_the_lyric_defaults_equal_to_model_store(client, checkpoints):
    body = (await post(client, prefix="分开", seed=8)).json()
    ck = checkpoints["gru"]
    expected = generate(ck.model, ck.vocab, "分开", 50, decoding(), seed=8)[0]
    assert body["text"] == expected.text and body["seed"] == 8 and len(body["generated"]) == 50
    assert decoding().temperature == LYRIC_DEFAULTS["temperature"] > 0 and decoding().best_of > 1
    nulls = dict.fromkeys(["temperature", "top_p", "no_repeat_ngram", "no_blank_runs", "best_of", "best_of_chars",
                           "max_char_run", "min_line_chars"])
    assert (await post(client, prefix="分开", seed=8, **nulls)).json() == body  # null: as if omitted
    assert (await post(client, prefix="分开", seed=8, best_of=1)).json()["text"] != body["text"]
    unseeded = (await post(client, prefix="分开")).json()
    assert isinstance(unseeded["seed"], int)  # sampled, so a seed is drawn and returned
    assert unseeded["text"] == generate(ck.model, ck.vocab, "分开", 50, decoding(), seed=unseeded["seed"])[0].text


async def test_greedy_is_deterministic(client):
    a, b = (await post(client, prefix="你说", max_chars=30, temperature=0),
            await post(client, prefix="你说", max_chars=30, temperature=0))
    assert a.json()["text"] == b.json()["text"]


async def test_model_is_chosen_by_name(client, checkpoints):
    body = (await post(client, prefix="分开", model="rnn", max_chars=20, temperature=0)).json()
    assert body["model"] == "rnn"
    assert body["text"] == generate(checkpoints["rnn"].model, checkpoints["rnn"].vocab, "分开", 20)[0].text


async def test_unknown_model_is_404_naming_the_loaded_ones(client):
    error = assert_error(await post(client, prefix="分开", model="nope"), 404, "model_not_found")
    assert "nope" in error["message"] and "gru" in error["message"] and "rnn" in error["message"]


@pytest.mark.parametrize("name", ["../gru", "gru.safetensors", "/etc/passwd", "", "GRU"])
async def test_model_names_are_never_paths(client, name):
    assert_error(await post(client, prefix="分开", model=name), 404, "model_not_found")


async def test_newlines_become_spaces_for_space_models(client, checkpoints):
    ck = checkpoints["rnn"]
    body = (await post(client, prefix="分开\n你说\r\n我", model="rnn", max_chars=10, temperature=0)).json()
    assert body["prefix"] == "分开 你说 我"
    assert body["text"] == generate(ck.model, ck.vocab, "分开 你说 我", 10)[0].text


async def test_newlines_are_kept_for_keep_models_and_line_endings_normalised(client, checkpoints):
    assert (await post(client, prefix="分开\n你", max_chars=5)).json()["prefix"] == "分开\n你"
    assert (await post(client, prefix="分开\r\n你\r我", max_chars=5)).json()["prefix"] == "分开\n你\n我"


async def test_max_chars(client):
    for n in (0, 1, 7):
        body = (await post(client, prefix="分开", max_chars=n)).json()
        assert len(body["generated"]) == n and body["usage"]["generated_chars"] == n
        assert body["finish_reason"] == "length"


async def test_seeded_sampling_is_reproducible_and_matches_model_store(client, checkpoints):
    request = dict(prefix="分开", temperature=1.0, seed=123, max_chars=40)
    a, b = (await post(client, **request)).json(), (await post(client, **request)).json()
    assert a == b and a["seed"] == 123
    ck = checkpoints["gru"]
    assert a["text"] == generate(ck.model, ck.vocab, "分开", 40, decoding(temperature=1.0), seed=123)[0].text
    other = (await post(client, **{**request, "seed": 124})).json()
    assert other["text"] != a["text"]


async def test_sampling_without_seed_returns_the_seed_that_reproduces_it(client):
    first = (await post(client, prefix="分开", temperature=1.0, max_chars=40)).json()
    assert isinstance(first["seed"], int)
    again = (await post(client, prefix="分开", temperature=1.0, max_chars=40, seed=first["seed"])).json()
    assert again["text"] == first["text"]


async def test_n_choices_use_consecutive_seeds(client):
    body = (await post(client, prefix="分开", temperature=1.0, seed=5, n=3, max_chars=30)).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["seed"] for c in body["choices"]] == [5, 6, 7]
    assert body["text"] == body["choices"][0]["text"] and body["seed"] == 5
    assert body["usage"]["generated_chars"] == 90
    single = (await post(client, prefix="分开", temperature=1.0, seed=6, max_chars=30)).json()
    assert single["text"] == body["choices"][1]["text"]
    assert len({c["text"] for c in body["choices"]}) > 1


async def test_greedy_n_gives_identical_choices(client):
    body = (await post(client, prefix="分开", n=2, max_chars=10, temperature=0)).json()
    assert body["choices"][0]["text"] == body["choices"][1]["text"]


async def test_top_k_one_and_tiny_top_p_are_greedy(client):
    # greedy with the rules a sampled request gets by default: best_of's candidates are then all alike
    rules = {k: LYRIC_DEFAULTS[k] for k in ("no_repeat_ngram", "no_blank_runs", "max_char_run", "min_line_chars")}
    greedy = (await post(client, prefix="分开", max_chars=30, temperature=0, **rules)).json()["text"]
    top_k = (await post(client, prefix="分开", max_chars=30, temperature=1.5, top_k=1, seed=1)).json()["text"]
    top_p = (await post(client, prefix="分开", max_chars=30, temperature=1.5, top_p=1e-6, seed=1)).json()["text"]
    assert top_k == greedy == top_p


async def test_max_char_run_matches_model_store_and_holds(client, checkpoints):
    ck = checkpoints["gru"]
    body = (await post(client, prefix="分开", max_chars=120, temperature=0, max_char_run=1)).json()
    expected = generate(ck.model, ck.vocab, "分开", 120, decoding(temperature=0, max_char_run=1))[0]
    assert body["generated"] == expected.generated
    assert not any(a == b for a, b in pairwise(body["text"])), body["text"]
    free = (await post(client, prefix="分开", max_chars=120, temperature=0)).json()["text"]
    assert any(a == b for a, b in pairwise(free)), free  # without the rule this model doubles characters


async def test_min_line_chars_matches_model_store_and_holds(client, checkpoints):
    ck = checkpoints["gru"]
    fields = dict(prefix="分开", max_chars=120, temperature=1.0, seed=3, best_of=1, min_line_chars=0)
    free = (await post(client, **fields)).json()["text"]
    assert min(len(line) for line in free.split("\n")[:-1]) < 8, free  # short lines without the rule
    body = (await post(client, **fields | {"min_line_chars": 8})).json()
    params = decoding(temperature=1.0, best_of=1, min_line_chars=8)
    assert body["generated"] == generate(ck.model, ck.vocab, "分开", 120, params, seed=3)[0].generated
    lines = body["text"].split("\n")[:-1]
    assert lines and min(len(line) for line in lines) >= 8, body["text"]


async def test_top_k_and_top_p_match_model_store(client, checkpoints):
    ck = checkpoints["gru"]
    params = decoding(temperature=0.9, top_k=5, top_p=0.8)
    body = (await post(client, prefix="分开", max_chars=40, temperature=0.9, top_k=5, top_p=0.8, seed=9)).json()
    assert body["text"] == generate(ck.model, ck.vocab, "分开", 40, params, seed=9)[0].text


async def test_repetition_penalty_matches_model_store(client, checkpoints):
    ck = checkpoints["gru"]
    body = (await post(client, prefix="分开", max_chars=40, temperature=0, repetition_penalty=3.0)).json()
    expected = generate(ck.model, ck.vocab, "分开", 40, decoding(temperature=0, repetition_penalty=3.0))[0].text
    assert body["text"] == expected
    assert expected != generate(ck.model, ck.vocab, "分开", 40)[0].text


async def test_stop_string_ends_the_text_and_is_not_included(client):
    greedy = (await post(client, prefix="分开", max_chars=50, temperature=0)).json()["generated"]
    stop = greedy[5:7]
    body = (await post(client, prefix="分开", max_chars=50, temperature=0, stop=[stop, "不会出现的"])).json()
    assert body["finish_reason"] == "stop"
    assert body["generated"] == greedy[: greedy.index(stop)]
    assert stop not in body["generated"]


async def test_unknown_characters_are_a_422_naming_them(client):
    error = assert_error(await post(client, prefix="分开xyz"), 422, "unknown_characters")
    assert "'x'" in error["message"] and "'z'" in error["message"]
    assert error["details"][0]["characters"] == ["x", "y", "z"]
    assert error["details"][0]["loc"] == ["body", "prefix"]


async def test_unknown_skip_drops_and_reports_them(client, checkpoints):
    body = (await post(client, prefix="x分y开x", unknown="skip", max_chars=10, temperature=0)).json()
    assert body["prefix"] == "分开" and body["unknown_skipped"] == 3 and body["unknown_characters"] == ["x", "y"]
    ck = checkpoints["gru"]
    assert body["text"] == generate(ck.model, ck.vocab, "分开", 10)[0].text


async def test_unknown_skip_of_every_character_is_422(client):
    assert_error(await post(client, prefix="xyz", unknown="skip"), 422, "empty_prefix")


async def test_empty_prefix_is_422_saying_one_character_is_needed(client):
    error = assert_error(await post(client, prefix=""), 422)
    assert "at least one character" in error["message"]
    assert error["details"][0]["loc"] == ["body", "prefix"]


async def test_missing_prefix_is_422(client):
    error = assert_error(await post(client, max_chars=5), 422)
    assert error["details"][0]["loc"] == ["body", "prefix"] and error["details"][0]["type"] == "missing"


@pytest.mark.parametrize("field,value", [
    ("max_chars", -1), ("max_chars", 1.5), ("max_chars", "many"), ("max_chars", 10**30),
    ("temperature", -0.1), ("temperature", 100.5), ("temperature", "hot"),
    ("top_k", -1), ("top_k", 10**7), ("top_p", 0), ("top_p", 1.01), ("top_p", -1),
    ("repetition_penalty", 0), ("repetition_penalty", 101), ("best_of", 0), ("best_of", 65), ("best_of_chars", 0),
    ("no_blank_runs", "often"), ("max_char_run", -1), ("max_char_run", 1001),
    ("min_line_chars", -1), ("min_line_chars", 1001), ("min_line_chars", 2.5), ("n", 0), ("n", -3), ("n", 10**9),
    ("seed", -1), ("seed", 2**60), ("seed", 1.5), ("seed", "abc"), ("stream", "maybe"), ("stream", [1]),
    ("unknown", "ignore"), ("model", 5), ("model", "m" * 201), ("stop", "\n"), ("stop", [1]), ("stop", [None]),
    ("prefix", 5), ("prefix", None), ("prefix", ["分"]), ("prefix", {"a": 1}), ("stop", ["x" * 10_001]),
    ("surprise", 1),
])
async def test_invalid_fields_are_422_naming_the_field(client, field, value):
    error = assert_error(await post(client, **{"prefix": "分开", field: value}), 422)
    assert any(d["loc"][:2] == ["body", field] for d in error["details"]), error
    assert field in error["message"]


@pytest.mark.parametrize("field,value", [("temperature", "NaN"), ("temperature", "Infinity"),
                                         ("top_p", "NaN"), ("repetition_penalty", "-Infinity")])
async def test_nan_and_infinity_are_422(client, field, value):
    r = await client.post("/generate", content=f'{{"prefix": "分开", "{field}": {value}}}',
                          headers={"content-type": "application/json"})
    error = assert_error(r, 422)
    assert error["details"][0]["loc"] == ["body", field]


async def test_configurable_limits(make_client, model_dir):
    settings = Settings(model_dir=model_dir, device="cpu", max_prefix_chars=4, max_new_chars=10, max_n=2,
                        max_stop=1, max_stop_chars=3, max_best_of=2)
    async with make_client(settings) as (_, client):
        assert (await post(client, prefix="分开的爱", max_chars=10, n=2, stop=["abc"], best_of=2)).status_code == 200
        assert len((await post(client, prefix="分开")).json()["generated"]) == 10  # the default 50, lowered
        for field, value in [("prefix", "分开的爱我"), ("max_chars", 11), ("n", 3), ("stop", ["a", "b"]),
                             ("stop", ["abcd"]),
                             ("best_of", 3)]:
            r = await post(client, **{"prefix": "分开", "max_chars": 5, field: value})
            error = assert_error(r, 422, "limit_exceeded")
            assert error["details"][0]["loc"] == ["body", field]


async def test_stream_sends_chunks_then_final_then_done(client):
    plain = (await post(client, prefix="分开", max_chars=30, seed=4)).json()  # best_of candidates, streamed
    r = await post(client, prefix="分开", max_chars=30, seed=4, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    chunks, final, events = stream_parts(r.text)
    assert chunks == {0: plain["generated"]}
    assert final == plain
    assert events[-1] == ("message", "[DONE]") and events[-2][0] == "final"
    assert len(events) > 3  # more than one chunk


async def test_stream_with_n_seed_and_stop(client):
    request = dict(prefix="分开", max_chars=40, temperature=1.0, seed=11, n=3, stop=["的"])
    plain = (await post(client, **request)).json()
    chunks, final, _ = stream_parts((await post(client, **request, stream=True)).text)
    assert chunks == {c["index"]: c["generated"] for c in plain["choices"] if c["generated"]}
    assert final == plain
    assert all("的" not in text for text in chunks.values())


async def test_stream_errors_before_the_stream_are_plain_json(client):
    assert_error(await post(client, prefix="分开", model="nope", stream=True), 404)
    assert_error(await post(client, prefix="xx", stream=True), 422, "unknown_characters")
    assert_error(await post(client, prefix="", stream=True), 422)


async def test_deadline_is_504_or_an_error_event(make_client, model_dir):
    settings = Settings(model_dir=model_dir, device="cpu", request_timeout_s=1e-6)
    async with make_client(settings) as (app, client):
        assert_error(await post(client, prefix="分开", max_chars=500), 504, "timeout")
        r = await post(client, prefix="分开", max_chars=500, stream=True)
        assert r.status_code == 200
        _, final, events = stream_parts(r.text)
        assert final is None and events[-1] == ("message", "[DONE]")
        assert events[-2][0] == "error" and '"timeout"' in events[-2][1]
        assert app.state.engine.finished["timeout"] == 2 and app.state.engine.in_flight == 0


async def test_busy_engine_answers_503_with_retry_after(make_client, model_dir, checkpoints):
    from model_store.generate import Request

    settings = Settings(model_dir=model_dir, device="cpu", max_batch=1, max_queue=0)
    async with make_client(settings) as (app, client):
        ck = checkpoints["gru"]
        job = app.state.engine.submit(ck, Request("分开", 100_000))
        try:
            r = await post(client, prefix="分开")
            assert_error(r, 503, "busy")
            assert r.headers["retry-after"] == "1"
            assert_error(await client.post("/perplexity", json={"text": "分开的爱"}), 503, "busy")
        finally:
            job.stop()
        await job.wait()
        assert (await post(client, prefix="分开")).status_code == 200


async def test_no_repeat_ngram_matches_model_store_and_never_repeats_an_ngram(client, checkpoints):
    ck = checkpoints["gru"]
    body = (await post(client, prefix="分开", max_chars=120, temperature=0, no_repeat_ngram=3)).json()
    expected = generate(ck.model, ck.vocab, "分开", 120, decoding(temperature=0, no_repeat_ngram=3))[0].text
    assert body["text"] == expected
    grams = [body["text"][i:i + 3] for i in range(len(body["text"]) - 2)]
    assert len(grams) == len(set(grams))
    looping = (await post(client, prefix="分开", max_chars=120, temperature=0)).json()["text"]
    assert len({looping[i:i + 3] for i in range(len(looping) - 2)}) < len(looping) - 2


@pytest.mark.parametrize("n", [1, -1, 1001])
async def test_no_repeat_ngram_out_of_range_is_422(client, n):
    assert_error(await post(client, prefix="分开", no_repeat_ngram=n), 422)


async def test_logprobs_give_each_generated_character_its_log_probability_and_alternatives(client):
    body = (await post(client, prefix="分开", max_chars=20, seed=4, logprobs=2, n=2)).json()
    for choice in body["choices"]:
        lp = choice["logprobs"]
        assert "".join(x["char"] for x in lp) == choice["generated"]
        for x in lp:
            assert x["logprob"] <= 0 and len(x["top"]) == 2 and x["top"][0]["logprob"] >= x["logprob"] - 1e-6
    scored = (await client.post("/perplexity", json={"text": body["text"], "per_char": True})).json()
    assert [x["logprob"] for x in body["choices"][0]["logprobs"]] == pytest.approx(
        [-c["nll"] for c in scored["per_char"][2:]], abs=1e-4)
    plain = (await post(client, prefix="分开", max_chars=20, seed=4)).json()
    assert "logprobs" not in plain["choices"][0] and plain["text"] == body["text"]  # asking changes no text
    assert_error(await post(client, prefix="分开", logprobs=21), 422)


async def test_streamed_chunks_carry_their_characters_logprobs(client):
    r = await post(client, prefix="分开", max_chars=15, seed=2, logprobs=1, stream=True)
    texts, final, events = stream_parts(r.text)
    chunks = [e for e in events if e[0] == "message" and e[1] != "[DONE]"]
    streamed = [x for _, data in chunks for x in json.loads(data)["logprobs"]]
    assert streamed == final["choices"][0]["logprobs"] and texts[0] == final["generated"]
