"""POST /generate with return_state and state: a continuation equals generating from the whole text,
also streamed and under concurrent load, and altered, expired or another model's handles get a 422."""

from __future__ import annotations

import re
import shutil
import time
from types import SimpleNamespace

import anyio
import pytest
from api_helpers import assert_error, stream_parts

import model_store.state
from app.settings import Settings
from model_store.generate import generate
from model_store.sampling import decoding

pytestmark = pytest.mark.anyio


async def post(client, **body):
    r = await client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def whole(ck, text: str, max_chars: int, **sampling) -> str:
    """What model_store generates from the whole text (newlines as the model reads them), the request's
    decoding fields read as the service reads them."""
    text = text.replace("\n", " ") if ck.newlines == "space" else text
    params = decoding(**{k: v for k, v in sampling.items() if k != "seed"})
    return generate(ck.model, ck.vocab, text, max_chars, params, seed=sampling.get("seed"))[0].generated


@pytest.mark.parametrize("model", ["gru", "rnn"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"seed": 9, "no_repeat_ngram": 0},
                                      {"temperature": 0.9, "top_k": 10, "seed": 4, "no_repeat_ngram": 0},
                                      {"temperature": 1.1, "top_p": 0.9, "repetition_penalty": 1.3, "seed": 21,
                                       "no_repeat_ngram": 0}])
@pytest.mark.parametrize("more", ["", "我", "\n窗外的"])
async def test_continuing_a_handle_equals_generating_from_the_whole_text(client, checkpoints, model, sampling, more):
    first = await post(client, prefix="分开", model=model, max_chars=17, return_state=True, **sampling)
    assert first["state"].startswith("ls1.") and first["choices"][0]["state"] == first["state"]
    then = await post(client, prefix=more, state=first["state"], max_chars=23, **sampling)
    assert then["model"] == model  # taken from the handle
    assert then["generated"] == whole(checkpoints[model], first["text"] + more, 23, **sampling)
    assert then["text"] == then["prefix"] + then["generated"] and "state" not in then



# A handle carries the state, the last character and which characters were seen, not the n-grams of the text
# it read: a continuation's no_repeat_ngram knows only its own prefix. So the sampled cases above turn it off,
# and with the lyric defaults (no_repeat_ngram 4) a continuation is not yet the whole text's.
async def test_continuing_a_handle_with_the_lyric_defaults_equals_generating_from_the_whole_text(client, checkpoints):
    for more in ("", "我", "\n窗外的"):
        first = await post(client, prefix="分开", max_chars=17, return_state=True, seed=9)
        then = await post(client, prefix=more, state=first["state"], max_chars=23, seed=9)
        assert then["generated"] == whole(checkpoints["gru"], first["text"] + more, 23, seed=9)

async def test_each_choice_has_its_own_handle(client, checkpoints):
    first = await post(client, prefix="你说", max_chars=12, temperature=1.0, seed=3, n=3, return_state=True)
    assert len({c["state"] for c in first["choices"]}) == 3 and first["state"] == first["choices"][0]["state"]
    for choice in first["choices"]:
        then = await post(client, prefix="", state=choice["state"], max_chars=15, temperature=0)
        assert then["generated"] == whole(checkpoints["gru"], choice["text"], 15, temperature=0)


async def test_a_handle_after_a_stop_string_continues_after_it(client, checkpoints):
    first = await post(client, prefix="分开", max_chars=200, stop=["\n"], return_state=True, temperature=0)
    assert first["finish_reason"] == "stop" and "\n" not in first["generated"]
    then = await post(client, prefix="", state=first["state"], max_chars=20, temperature=0)
    assert then["generated"] == whole(checkpoints["gru"], first["text"] + "\n", 20, temperature=0)


async def test_handles_chain_and_prime_without_generating(client, checkpoints):
    primed = await post(client, prefix="手中的铅笔", max_chars=0, return_state=True)
    assert primed["generated"] == "" and primed["state"]
    a = await post(client, prefix=" 在", state=primed["state"], max_chars=6, return_state=True, temperature=0)
    b = await post(client, prefix="", state=a["state"], max_chars=10, temperature=0)
    assert b["generated"] == whole(checkpoints["gru"], "手中的铅笔" + a["text"], 10, temperature=0)


async def test_the_final_stream_event_carries_the_handle(client, checkpoints):
    r = await client.post("/generate", json={"prefix": "分开", "max_chars": 9, "stream": True, "return_state": True,
                                             "seed": 6})
    _, final, _ = stream_parts(r.text)
    then = await post(client, prefix="的", state=final["state"], max_chars=9, stream=False, temperature=0)
    assert then["generated"] == whole(checkpoints["gru"], final["text"] + "的", 9, temperature=0)


async def test_concurrent_continuations_each_equal_the_whole_text(make_client, model_dir, checkpoints):
    """Through the engine's shared batch: handles and plain requests of both models, all at once."""
    # each request is best_of (8) rows: five fit in a batch, the others queue
    settings = Settings(model_dir=model_dir, device="cpu", default_model="gru", max_batch=40, max_queue=128)
    async with make_client(settings) as (_, client):
        starts = [await post(client, prefix=p, model=m, max_chars=8, return_state=True, temperature=0.8, seed=i)
                  for i, (p, m) in enumerate([("分开", "gru"), ("你说", "rnn"), ("我用", "gru"), ("窗外", "rnn")])]
        results: dict[int, dict] = {}

        async def run(i):
            start = starts[i % 4]
            body = {"prefix": "的" * (i % 3), "max_chars": 20 + i, "temperature": 0.7, "seed": 100 + i,
                    "no_repeat_ngram": 0}  # not carried by a handle (above)
            if i % 5 == 4:  # a plain request among them
                body.update(prefix=start["text"], model=start["model"])
            else:
                body["state"] = start["state"]
            results[i] = (await post(client, **body)), start

        async with anyio.create_task_group() as tg:
            for i in range(16):
                tg.start_soon(run, i)
    for i, (answer, start) in results.items():
        text = start["text"] + ("" if i % 5 == 4 else "的" * (i % 3))
        assert answer["generated"] == whole(checkpoints[start["model"]], text, 20 + i, temperature=0.7, seed=100 + i,
                                            no_repeat_ngram=0)


def altered(handle: str) -> str:
    body, signature = handle.rsplit(".", 1)
    middle = len(body) // 2
    return body[:middle] + ("A" if body[middle] != "A" else "B") + body[middle + 1:] + "." + signature


@pytest.mark.parametrize("bad,words", [(altered, "signature does not match"),
                                       (lambda h: h[: len(h) // 2], "signature does not match|not a state handle"),
                                       (lambda h: "not a handle", "not a state handle"),
                                       (lambda h: h.replace("ls1.", "ls2."), "not a state handle")])
async def test_altered_or_malformed_handles_are_422(client, bad, words):
    handle = (await post(client, prefix="分开", max_chars=3, return_state=True))["state"]
    error = assert_error(await client.post("/generate", json={"prefix": "的", "state": bad(handle)}), 422)
    assert error["details"][0]["loc"] == ["body", "state"] and error["details"][0]["type"] == "state_invalid"
    assert re.search(words, error["message"])


async def test_a_handle_signed_with_another_key_is_refused(make_client, model_dir):
    async with make_client(Settings(model_dir=model_dir, device="cpu", state_key="one key")) as (_, client):
        handle = (await post(client, prefix="分开", max_chars=3, return_state=True))["state"]
    async with make_client(Settings(model_dir=model_dir, device="cpu", state_key="another key")) as (_, client):
        error = assert_error(await client.post("/generate", json={"prefix": "", "state": handle}), 422, "state_invalid")
    assert "LYRICS_STATE_KEY" in error["message"]


async def test_replicas_with_one_key_accept_each_others_handles(make_client, model_dir, checkpoints):
    async with make_client(Settings(model_dir=model_dir, device="cpu", state_key="shared")) as (_, client):
        first = await post(client, prefix="分开", max_chars=5, return_state=True)
    async with make_client(Settings(model_dir=model_dir, device="cpu", state_key="shared")) as (_, client):
        then = await post(client, prefix="", state=first["state"], max_chars=12, temperature=0)
    assert then["generated"] == whole(checkpoints["gru"], first["text"], 12, temperature=0)


async def test_an_expired_handle_is_422(make_client, model_dir, monkeypatch):
    async with make_client(Settings(model_dir=model_dir, device="cpu", state_ttl_s=60)) as (_, client):
        handle = (await post(client, prefix="分开", max_chars=3, return_state=True))["state"]
        assert (await client.post("/generate", json={"prefix": "", "state": handle})).status_code == 200
        later = time.time() + 61
        monkeypatch.setattr(model_store.state, "time", SimpleNamespace(time=lambda: later, gmtime=time.gmtime,
                                                                     strftime=time.strftime))
        error = assert_error(await client.post("/generate", json={"prefix": "", "state": handle}), 422, "state_expired")
    assert "expired" in error["message"] and "LYRICS_STATE_TTL_S" in error["message"]


async def test_another_models_handle_is_422(client):
    handle = (await post(client, prefix="分开", model="gru", max_chars=3, return_state=True))["state"]
    error = assert_error(await client.post("/generate", json={"prefix": "", "state": handle, "model": "rnn"}), 422,
                         "state_model_mismatch")
    assert "'gru'" in error["message"]


async def test_a_handle_from_before_the_model_changed_is_422(make_client, model_dir, tmp_path):
    async with make_client(Settings(model_dir=model_dir, device="cpu", state_key="k")) as (_, client):
        handle = (await post(client, prefix="分开", model="gru", max_chars=3, return_state=True))["state"]
    changed = tmp_path / "models"
    changed.mkdir()
    shutil.copy(model_dir / "rnn.safetensors", changed / "gru.safetensors")  # same name, other weights
    async with make_client(Settings(model_dir=changed, device="cpu", state_key="k")) as (_, client):
        error = assert_error(await client.post("/generate", json={"prefix": "", "state": handle}), 422,
                             "state_model_mismatch")
    assert "has changed" in error["message"]


async def test_an_empty_prefix_still_needs_a_handle(client):
    error = assert_error(await client.post("/generate", json={"prefix": ""}), 422, "empty_prefix")
    assert error["details"][0]["loc"] == ["body", "prefix"]
