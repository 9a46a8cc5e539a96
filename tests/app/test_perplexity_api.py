"""POST /perplexity in-process: values equal model_store's scoring; lists, policies and errors."""

from __future__ import annotations

import math

import pytest
from api_helpers import assert_error

from app.settings import Settings
from model_store.scoring import score_text

pytestmark = pytest.mark.anyio

TEXT = "分开的爱 我不要\n你说这一句"


async def post(client, **body):
    return await client.post("/perplexity", json=body)


async def test_one_text_equals_score_text(client, checkpoints):
    r = await post(client, text=TEXT)
    assert r.status_code == 200, r.text
    body = r.json()
    s = score_text(checkpoints["gru"].model, checkpoints["gru"].vocab, TEXT)
    assert body["model"] == "gru" and body["unknown"] == "error"
    assert body["perplexity"] == pytest.approx(s.perplexity, rel=1e-6)
    assert body["cross_entropy"] == pytest.approx(s.cross_entropy, rel=1e-6)
    assert body["bits_per_char"] == pytest.approx(s.cross_entropy / math.log(2), rel=1e-6)
    assert body["chars_scored"] == len(TEXT) - 1 and body["unknown_skipped"] == 0
    assert len(body["results"]) == 1
    result = body["results"][0]
    assert result["index"] == 0 and result["perplexity"] == body["perplexity"]
    assert result["chars_scored"] == body["chars_scored"]


async def test_a_list_is_scored_text_by_text_and_in_total(client, checkpoints):
    texts = ["分开的爱", "我不要 你说", "手中的铅笔"]
    body = (await post(client, text=texts)).json()
    ck = checkpoints["gru"]
    scores = [score_text(ck.model, ck.vocab, t) for t in texts]
    assert [r["index"] for r in body["results"]] == [0, 1, 2]
    for result, s in zip(body["results"], scores, strict=True):
        assert result["perplexity"] == pytest.approx(s.perplexity, rel=1e-6)
        assert result["chars_scored"] == s.chars_scored
    chars = sum(s.chars_scored for s in scores)
    ce = sum(s.cross_entropy * s.chars_scored for s in scores) / chars
    assert body["chars_scored"] == chars
    assert body["cross_entropy"] == pytest.approx(ce, rel=1e-6)
    assert body["perplexity"] == pytest.approx(math.exp(ce), rel=1e-6)


async def test_a_trained_model_prefers_its_lyrics_to_shuffled_ones(client):
    lyric = (await post(client, text="你说这一句 像雨后的街道")).json()["perplexity"]
    shuffled = (await post(client, text="道街的后雨像 句一这说你")).json()["perplexity"]
    assert lyric < shuffled


async def test_model_by_name_and_newlines_as_spaces(client, checkpoints):
    body = (await post(client, text=TEXT, model="rnn")).json()
    ck = checkpoints["rnn"]
    assert body["model"] == "rnn"
    assert body["perplexity"] == pytest.approx(score_text(ck.model, ck.vocab, TEXT.replace("\n", " ")).perplexity,
                                               rel=1e-6)


async def test_windows_line_endings_score_like_unix_ones(client):
    unix = (await post(client, text="分开的爱\n我不要\n")).json()
    assert (await post(client, text="分开的爱\r\n我不要\r\n")).json() == unix


async def test_unknown_characters_are_422_naming_them_and_the_text(client):
    error = assert_error(await post(client, text=["分开的爱", "分开xy"]), 422, "unknown_characters")
    assert error["details"][0]["loc"] == ["body", "text", 1]
    assert error["details"][0]["characters"] == ["x", "y"]


async def test_unknown_skip_drops_and_counts_them(client, checkpoints):
    body = (await post(client, text="分x开的y爱x", unknown="skip")).json()
    ck = checkpoints["gru"]
    s = score_text(ck.model, ck.vocab, "分x开的y爱x", unknown="skip")
    assert body["unknown"] == "skip" and body["unknown_skipped"] == 3 == s.unknown_skipped
    assert body["unknown_characters"] == ["x", "y"] and body["results"][0]["unknown_characters"] == ["x", "y"]
    assert body["chars_scored"] == 3
    assert body["perplexity"] == pytest.approx(s.perplexity, rel=1e-6)


@pytest.mark.parametrize("text", ["分", "", ["分开", "我"], ["分开", ""]])
async def test_texts_under_two_characters_are_422(client, text):
    error = assert_error(await post(client, text=text), 422, "too_short")
    assert "two characters" in error["message"]


async def test_skipping_down_to_one_character_is_422(client):
    assert_error(await post(client, text="分xyz", unknown="skip"), 422, "too_short")


async def test_empty_list_is_422(client):
    assert_error(await post(client, text=[]), 422, "too_short")


@pytest.mark.parametrize("body", [{}, {"text": 5}, {"text": [1, 2]}, {"text": None}, {"text": {"a": "b"}},
                                  {"text": "分开", "unknown": "keep"}, {"text": "分开", "model": 3},
                                  {"text": "分开", "extra": True}])
async def test_invalid_fields_are_422(client, body):
    assert_error(await client.post("/perplexity", json=body), 422, "validation_error")


async def test_unknown_model_is_404(client):
    assert_error(await post(client, text="分开的", model="lstm"), 404, "model_not_found")


async def test_configurable_limits(make_client, model_dir):
    settings = Settings(model_dir=model_dir, device="cpu", max_texts=2, max_text_chars=5)
    async with make_client(settings) as (_, client):
        assert (await post(client, text=["分开的爱", "分开"])).status_code == 200
        assert_error(await post(client, text=["分开", "分开", "分开"]), 422, "limit_exceeded")
        error = assert_error(await post(client, text="分开的爱我不"), 422, "limit_exceeded")
        assert error["details"][0]["loc"] == ["body", "text"]


async def test_per_char_lists_every_character_with_its_nll_and_the_mean_is_the_cross_entropy(client, checkpoints):
    body = (await post(client, text=TEXT, per_char=True)).json()
    ck = checkpoints["gru"]
    expected = score_text(ck.model, ck.vocab, TEXT, per_char=True)
    per_char = body["per_char"]
    assert [c["char"] for c in per_char] == list(TEXT)
    assert per_char[0] == {"char": TEXT[0], "nll": None, "nll_bits": None}
    scored = [c["nll"] for c in per_char[1:]]
    # the service scores with oneDNN-packed weights: float32 rounding differs
    assert scored == pytest.approx([c.nll for c in expected.per_char[1:]], rel=1e-5, abs=1e-6)
    assert sum(scored) / len(scored) == pytest.approx(body["cross_entropy"], rel=1e-9)
    assert all(c["nll_bits"] == pytest.approx(c["nll"] / math.log(2)) for c in per_char[1:])
    assert body["results"][0]["per_char"] == per_char


async def test_per_char_spans_are_the_most_surprising_runs(client):
    body = (await post(client, text=TEXT, per_char=True, top_spans=2, span_chars=4)).json()
    spans = body["surprising_spans"]
    nll = [c["nll"] or 0.0 for c in body["per_char"]]
    best = max(sum(nll[s:s + 4]) for s in range(len(nll) - 3))
    assert len(spans) == 2 and spans[0]["nats"] == pytest.approx(best)
    for span in spans:
        assert span["end"] - span["start"] == 4 and span["text"] == TEXT[span["start"]:span["end"]]
        assert span["nats"] == pytest.approx(sum(nll[span["start"]:span["end"]]))
        assert span["bits"] == pytest.approx(span["nats"] / math.log(2))
    assert spans[0]["end"] <= spans[1]["start"] or spans[1]["end"] <= spans[0]["start"]


async def test_per_char_is_absent_unless_asked(client):
    body = (await post(client, text=TEXT)).json()
    assert body["per_char"] is None and body["surprising_spans"] is None
    assert body["results"][0]["per_char"] is None


async def test_per_char_of_a_list_is_per_result(client):
    body = (await post(client, text=["分开的爱", "我不要"], per_char=True)).json()
    assert body["per_char"] is None  # several texts: see each result
    assert ["".join(c["char"] for c in r["per_char"]) for r in body["results"]] == ["分开的爱", "我不要"]
    assert all(r["per_char"][0]["nll"] is None for r in body["results"])


async def test_per_char_marks_skipped_unknown_characters_and_the_text_as_read(client, checkpoints):
    body = (await post(client, text="x分开\r\n的y爱", model="rnn", unknown="skip", per_char=True)).json()
    per_char = body["per_char"]
    assert "".join(c["char"] for c in per_char) == "x分开 的y爱"  # newlines as spaces for this model
    assert [c["nll"] is None for c in per_char] == [True, True, False, False, False, True, False]
    assert sum(1 for c in per_char if c["nll"] is not None) == body["chars_scored"] == 4


async def test_per_char_total_length_is_limited(make_client, model_dir):
    settings = Settings(model_dir=model_dir, device="cpu", max_per_char_chars=6)
    async with make_client(settings) as (_, client):
        assert (await post(client, text=["分开的", "我不要"], per_char=True)).status_code == 200
        assert (await post(client, text="分开的爱 我不要")).status_code == 200  # without per_char: no such limit
        error = assert_error(await post(client, text=["分开的", "我不要 "], per_char=True), 422, "limit_exceeded")
        assert "LYRICS_MAX_PER_CHAR_CHARS" in error["message"] and "7" in error["message"]


@pytest.mark.parametrize("field", [{"top_spans": -1}, {"top_spans": 101}, {"span_chars": 0}, {"per_char": "maybe"}])
async def test_per_char_parameters_out_of_range_are_422(client, field):
    assert_error(await post(client, **{"text": TEXT, "per_char": True, **field}), 422, "validation_error")
