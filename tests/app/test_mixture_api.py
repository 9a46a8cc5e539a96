"""A mixture model served like any other: /models describes it, /generate and /perplexity give exactly
what model_store gives for it (generation from its recurrent model alone, scoring from the whole mixture),
and concurrent batched requests change nothing."""

import asyncio
import shutil

import pytest
from conftest import CORPUS

from app.settings import Settings
from model_store.checkpoint import save_checkpoint
from model_store.generate import generate
from model_store.mixture import MixtureConfig, MixtureLM
from model_store.ngram import KneserNey
from model_store.sampling import decoding
from model_store.scoring import score_text

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def mixture_dir(tmp_path_factory, model_dir, checkpoints):
    gru = checkpoints["gru"]
    weights = tuple((0.5 - 0.1 * k, 0.3, 0.2 + 0.1 * k) for k in range(4))
    mixture = MixtureLM(gru.model, KneserNey.fit(gru.vocab.encode(CORPUS[:600]), 4, len(gru.vocab)),
                        MixtureConfig(weights=weights, cache_order=3, cache_window=64))
    directory = tmp_path_factory.mktemp("mixture-models")
    shutil.copy(model_dir / "gru.safetensors", directory / "gru.safetensors")
    save_checkpoint(directory / "mix.safetensors", mixture, gru.vocab, gru.newlines,
                    {**gru.training, "val_perplexity": 1.01})
    return directory


@pytest.fixture
async def mix_client(make_client, mixture_dir):
    async with make_client(Settings(model_dir=mixture_dir, device="cpu")) as (_, client):
        yield client


async def test_models_lists_the_mixture_as_default_with_its_components(mix_client):
    body = (await mix_client.get("/models")).json()
    assert body["default"] == "mix"  # the lowest validation perplexity
    entry = {m["name"]: m for m in body["models"]}
    assert entry["mix"]["mixture"]["ngram_order"] == 4 and entry["mix"]["mixture"]["cache_order"] == 3
    assert entry["gru"]["mixture"] is None


async def test_perplexity_of_the_mixture_equals_model_stores(mix_client, mixture_dir):
    from model_store.checkpoint import load_checkpoint
    ck = load_checkpoint(mixture_dir / "mix.safetensors")
    text = "手中的铅笔 画着远方的船\n手中的铅笔 画着远方的船\n"
    body = (await mix_client.post("/perplexity", json={"text": text, "model": "mix"})).json()
    assert body["perplexity"] == pytest.approx(score_text(ck.model, ck.vocab, text).perplexity, rel=1e-5)
    plain = (await mix_client.post("/perplexity", json={"text": text, "model": "gru"})).json()
    assert body["perplexity"] != pytest.approx(plain["perplexity"], rel=1e-3)


async def test_concurrent_generations_from_the_mixture_equal_each_alone(mix_client, mixture_dir):
    from model_store.checkpoint import load_checkpoint
    ck = load_checkpoint(mixture_dir / "mix.safetensors")
    requests = [{"prefix": p, "model": "mix", "max_chars": n, "temperature": t, "seed": 7}
                for p, n, t in (("分开", 30, 0), ("手中的", 12, 0.8), ("窗外", 25, 1.0), ("我用", 5, 0))]
    answers = await asyncio.gather(*(mix_client.post("/generate", json=r) for r in requests))
    for request, answer in zip(requests, answers, strict=True):
        assert answer.status_code == 200, answer.text
        alone = generate(ck.model, ck.vocab, request["prefix"], request["max_chars"],
                         decoding(temperature=request["temperature"]), seed=7)[0]
        assert answer.json()["text"] == alone.text
        recurrent = (await mix_client.post("/generate", json={**request, "model": "gru"})).json()
        assert answer.json()["text"] == recurrent["text"]  # the mixture's recurrent model, without the cache
