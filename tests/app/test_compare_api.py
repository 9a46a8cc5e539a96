"""POST /compare in-process: each model's answer equals that model alone, side by side with its
score, latency and provenance; model names, characters, limits, backpressure and auth."""

from __future__ import annotations

import shutil

import anyio
import pytest
from api_helpers import assert_error, metric

from app.settings import Settings
from model_store.checkpoint import save_checkpoint
from model_store.generate import Request, generate
from model_store.model import CharLM, ModelConfig
from model_store.sampling import decoding
from model_store.scoring import score_text
from model_store.vocab import Vocabulary

pytestmark = pytest.mark.anyio

TEXT = "分开的爱 我不要\n你说这一句"


async def post(client, **body):
    return await client.post("/compare", json=body)


def alone(ck, prefix: str, max_chars: int, seed: int | None = None, stop=(), **fields):
    """What model_store gives for the request's decoding fields (`decoding`, as the service reads them)."""
    return generate(ck.model, ck.vocab, prefix, max_chars, decoding(**fields), stop, seed=seed)[0]


async def test_every_loaded_model_by_default_each_as_it_would_generate_alone(client, checkpoints):
    r = await post(client, prefix="分开", max_chars=30, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["prefix"] == "分开" and body["seed"] is None and body["text"] is None
    assert [x["model"] for x in body["results"]] == ["gru", "rnn"]
    for result in body["results"]:
        expected = alone(checkpoints[result["model"]], "分开", 30, temperature=0)
        assert (result["text"], result["generated"], result["finish_reason"]) == (
            expected.text, expected.generated, expected.finish_reason)
        assert result["latency_ms"] > 0
        assert result["score"] is None and result["score_ms"] is None


async def test_one_seed_for_every_model_drawn_when_omitted_and_returned(client, checkpoints):
    body = (await post(client, prefix="你说", max_chars=25, temperature=0.9, models=["rnn", "gru"])).json()
    seed = body["seed"]
    assert isinstance(seed, int)
    assert [x["model"] for x in body["results"]] == ["rnn", "gru"]  # the order asked for
    for result in body["results"]:
        assert result["text"] == alone(checkpoints[result["model"]], "你说", 25, seed, temperature=0.9).text
    again = (await post(client, prefix="你说", max_chars=25, temperature=0.9, models=["rnn", "gru"], seed=seed)).json()
    assert again["results"][0]["text"] == body["results"][0]["text"]


async def test_the_same_seed_as_generate(client):
    compared = (await post(client, prefix="分开", max_chars=20, temperature=1.0, seed=11, models=["gru"])).json()
    generated = (await client.post("/generate", json={"prefix": "分开", "max_chars": 20, "temperature": 1.0,
                                                      "seed": 11, "model": "gru"})).json()
    assert compared["results"][0]["text"] == generated["text"]


async def test_a_text_is_scored_by_every_model_as_it_reads_it(client, checkpoints):
    body = (await post(client, prefix="分开", max_chars=5, text=TEXT)).json()
    assert body["text"] == TEXT
    for result in body["results"]:
        ck = checkpoints[result["model"]]
        as_read = TEXT.replace("\n", " ") if ck.newlines == "space" else TEXT
        expected = score_text(ck.model, ck.vocab, as_read)
        assert result["score"]["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
        assert result["score"]["cross_entropy"] == pytest.approx(expected.cross_entropy, rel=1e-6)
        assert result["score"]["chars_scored"] == len(TEXT) - 1
        assert result["score_ms"] > 0


async def test_provenance_comes_from_each_checkpoint(client, checkpoints):
    body = (await post(client, prefix="分开", max_chars=1)).json()
    for result in body["results"]:
        ck, p = checkpoints[result["model"]], result["provenance"]
        assert p["cell"] == ck.config.cell and p["hidden_size"] == ck.config.hidden_size
        assert p["parameters"] == ck.model.num_parameters() and p["newlines"] == ck.newlines
        for key in ("epochs", "best_epoch", "val_perplexity", "train_perplexity", "command", "corpus_sha256",
                    "corpus_chars", "created_at"):
            assert p[key] == ck.training[key] and p[key] is not None, key
        assert len(p["corpus_sha256"]) == 64


async def test_stop_strings_and_prefix_newlines_apply_per_model(client, checkpoints):
    body = (await post(client, prefix="分开\r\n", max_chars=40, stop=["的"], seed=6)).json()
    by_model = {x["model"]: x for x in body["results"]}
    assert by_model["gru"]["prefix"] == "分开\n" and by_model["rnn"]["prefix"] == "分开 "
    for name, result in by_model.items():
        ck = checkpoints[name]
        expected = alone(ck, result["prefix"], 40, seed=6, stop=["的"])
        assert result["generated"] == expected.generated and "的" not in result["generated"]


async def test_unknown_models_are_one_404_naming_them_all(client):
    error = assert_error(await post(client, prefix="分开", models=["gru", "lstm", "transformer"]), 404,
                         "model_not_found")
    assert "'lstm'" in error["message"] and "'transformer'" in error["message"] and "gru, rnn" in error["message"]


@pytest.mark.parametrize(("body", "kind"), [
    ({"prefix": "分开", "models": ["gru", "gru"]}, "duplicate_model"),
    ({"prefix": "分开", "models": []}, "validation_error"),
    ({"prefix": "分开", "n": 2}, "validation_error"),
    ({"prefix": "分开", "stream": True}, "validation_error"),
    ({"prefix": "分开", "text": 5}, "validation_error"),
    ({"prefix": "分开", "models": "gru"}, "validation_error"),
])
async def test_invalid_fields_are_422(client, body, kind):
    assert_error(await client.post("/compare", json=body), 422, kind)


async def test_an_empty_prefix_is_422(client):
    error = assert_error(await post(client, prefix=""), 422)
    assert error["details"][0]["type"] == "empty_prefix" and error["details"][0]["loc"] == ["body", "prefix"]


async def test_a_text_too_short_for_scoring_is_422_naming_the_model(client):
    error = assert_error(await post(client, prefix="分开", text="分"), 422, "validation_error")
    assert [d["model"] for d in error["details"]] == ["gru", "rnn"]
    assert all(d["type"] == "too_short" and d["loc"] == ["body", "text"] for d in error["details"])


async def test_configurable_limits(make_client, model_dir):
    settings = Settings(model_dir=model_dir, device="cpu", max_new_chars=10, max_text_chars=5, max_prefix_chars=3)
    async with make_client(settings) as (_, client):
        assert (await post(client, prefix="分开", max_chars=10, text="分开的爱")).status_code == 200
        for body, field in (({"prefix": "分开", "max_chars": 11}, "max_chars"),
                            ({"prefix": "分开的爱", "max_chars": 1}, "prefix"),
                            ({"prefix": "分开", "max_chars": 1, "text": "分开的爱我不"}, "text")):
            error = assert_error(await post(client, **body), 422, "limit_exceeded")
            assert error["details"][0]["loc"] == ["body", field]


@pytest.fixture(scope="module")
def mixed_dir(model_dir, tmp_path_factory):
    """The test gru and a tiny model whose vocabulary lacks most of the corpus's characters."""
    directory = tmp_path_factory.mktemp("mixed")
    shutil.copy(model_dir / "gru.safetensors", directory / "gru.safetensors")
    vocab = Vocabulary("分开的爱我不要 ")
    model = CharLM(ModelConfig(cell="lstm", vocab_size=len(vocab), hidden_size=8))
    save_checkpoint(directory / "tiny.safetensors", model, vocab, training={"epochs": "three", "val_perplexity": 7.5})
    return directory


async def test_characters_one_model_lacks_are_422_naming_that_model(make_client, mixed_dir):
    async with make_client(Settings(model_dir=mixed_dir, device="cpu")) as (_, client):
        error = assert_error(await post(client, prefix="分开你", max_chars=3), 422, "unknown_characters")
        assert [(d["model"], d["characters"]) for d in error["details"]] == [("tiny", ["你"])]
        assert "tiny" in error["message"]


async def test_unknown_skip_drops_per_model(make_client, mixed_dir):
    async with make_client(Settings(model_dir=mixed_dir, device="cpu")) as (_, client):
        body = (await post(client, prefix="分开你", max_chars=3, unknown="skip", text="你说分开的爱")).json()
        gru, tiny = body["results"]
        assert (gru["prefix"], gru["unknown_skipped"], gru["unknown_characters"]) == ("分开你", 0, [])
        assert (tiny["prefix"], tiny["unknown_skipped"], tiny["unknown_characters"]) == ("分开", 1, ["你"])
        assert tiny["score"]["unknown_characters"] == ["你", "说"] and tiny["score"]["chars_scored"] == 3
        assert gru["score"]["unknown_skipped"] == 0


async def test_odd_training_metadata_becomes_null_provenance(make_client, mixed_dir):
    async with make_client(Settings(model_dir=mixed_dir, device="cpu")) as (_, client):
        r = await post(client, prefix="分开", max_chars=2, models=["tiny"])
        assert r.status_code == 200, r.text
        p = r.json()["results"][0]["provenance"]
        assert p["epochs"] is None and p["val_perplexity"] == 7.5 and p["command"] is None


async def test_busy_engine_is_503_and_the_admitted_generations_are_stopped(make_client, model_dir):
    settings = Settings(model_dir=model_dir, device="cpu", max_batch=1, max_queue=0)
    async with make_client(settings) as (app, client):
        # two models need two sequences: the second is refused, the first stopped
        r = await post(client, prefix="分开", max_chars=2000)
        assert_error(r, 503, "busy")
        assert r.headers["retry-after"] == "1"
        engine = app.state.engine
        await settled(engine)
        assert engine.finished["cancelled"] == 1
        # one model and a text: the scoring call is refused while the generation runs
        assert_error(await post(client, prefix="分开", max_chars=2000, models=["gru"], text="分开的爱"), 503, "busy")
        await settled(engine)
        assert engine.pending == 0 and engine.finished["cancelled"] == 2
        assert (await post(client, prefix="分开", max_chars=5, models=["gru"])).status_code == 200


async def test_deadline_is_504(make_client, model_dir):
    settings = Settings(model_dir=model_dir, device="cpu", request_timeout_s=1e-6)
    async with make_client(settings) as (app, client):
        assert_error(await post(client, prefix="分开", max_chars=500), 504, "timeout")
        await settled(app.state.engine)  # the other model's generation, stopped on the way out, retires
        assert app.state.engine.in_flight == 0 and app.state.engine.pending == 0


async def settled(engine) -> None:
    """Wait (up to 5 s) until the engine has nothing running or waiting."""
    for _ in range(500):
        if engine.pending == 0 and engine.in_flight == 0:
            return
        await anyio.sleep(0.01)


async def test_each_model_runs_in_its_own_batch_beside_other_requests(app_client, checkpoints):
    app, client = app_client
    served = app.state.models.models
    other = app.state.engine.submit(served["gru"], Request("手中", 50), stream=False)
    body = (await post(client, prefix="分开", max_chars=30, seed=21)).json()
    await other.wait()
    assert set(app.state.engine.schedulers) == {id(ck.model) for ck in served.values()}  # one per model, no more
    assert body["results"][0]["text"] == alone(checkpoints["gru"], "分开", 30, seed=21).text
    assert body["results"][1]["text"] == alone(checkpoints["rnn"], "分开", 30, seed=21).text


async def test_metrics_count_each_models_generation(app_client):
    app, client = app_client
    body = (await post(client, prefix="分开", max_chars=12, text="分开的爱")).json()
    text = (await client.get("/metrics")).text
    for result in body["results"]:
        name = result["model"]
        assert metric(text, "lyrics_compare_generation_seconds_count", model=name) == 1
        assert metric(text, "lyrics_generated_chars_total", model=name) == len(result["generated"])
        assert metric(text, "lyrics_scored_chars_total", model=name) == 3
    assert metric(text, "lyrics_http_requests_total", route="/compare", method="POST", status="200") == 1


async def test_api_keys_guard_compare(make_client, model_dir):
    settings = Settings(model_dir=model_dir, device="cpu", api_keys="k-compare-1")
    async with make_client(settings) as (_, client):
        assert_error(await post(client, prefix="分开", max_chars=2), 401)
        r = await client.post("/compare", json={"prefix": "分开", "max_chars": 2},
                              headers={"Authorization": "Bearer k-compare-1"})
        assert r.status_code == 200, r.text


async def test_openapi_documents_compare_with_examples(client):
    spec = (await client.get("/openapi.json")).json()
    operation = spec["paths"]["/compare"]["post"]
    assert {"200", "404", "422", "503", "504"} <= set(operation["responses"])
    request = spec["components"]["schemas"]["CompareRequest"]
    assert {"prefix", "models", "text", "seed", "temperature", "max_chars"} <= set(request["properties"])
    assert request["examples"] and all(request["properties"][k].get("description") for k in ("models", "text"))
    assert {"latency_ms", "score", "provenance"} <= set(spec["components"]["schemas"]["CompareResult"]["properties"])
