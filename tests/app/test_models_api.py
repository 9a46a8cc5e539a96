"""GET /models and /models/{name}, the default model, and what the lifespan loads, skips and refuses."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from api_helpers import assert_error

from app.main import create_app
from app.served import StartupError
from app.settings import Settings
from lyrics_cli import main as cli_main
from model_store import onednn
from model_store.registry import describe, load_directory

pytestmark = pytest.mark.anyio

FIELDS = {"name", "default", "cell", "hidden_size", "num_layers", "embed_size", "vocab_size", "parameters",
          "newlines", "impl", "packed", "device", "dtype", "train_perplexity", "val_perplexity", "training", "mixture"}


async def test_models_lists_every_loaded_model_with_its_metadata(client, checkpoints):
    r = await client.get("/models")
    assert r.status_code == 200
    body = r.json()
    assert body["default"] == "gru"
    assert [m["name"] for m in body["models"]] == ["gru", "rnn"]  # broken.safetensors was skipped
    for m in body["models"]:
        assert set(m) == FIELDS
        ck = checkpoints[m["name"]]
        assert m["default"] == (m["name"] == "gru")
        assert m["cell"] == ck.config.cell and m["hidden_size"] == 32 and m["num_layers"] == 1
        assert m["vocab_size"] == len(ck.vocab) and m["parameters"] == ck.model.num_parameters()
        assert m["packed"] is onednn.available()  # the service packs every CPU model it loads
        assert m["device"] == "cpu" and m["dtype"] == "float32"
        assert m["val_perplexity"] == ck.training["val_perplexity"] and m["training"]["epochs"] == 3
    assert {m["name"]: m["newlines"] for m in body["models"]} == {"gru": "keep", "rnn": "space"}


async def test_models_entries_are_registry_describe(client, checkpoints):
    body = (await client.get("/models")).json()
    assert body["models"] == [describe(checkpoints[name], "gru") for name in ("gru", "rnn")]


async def test_cli_models_json_has_the_same_shape(client, model_dir, capsys):
    http = (await client.get("/models")).json()
    assert cli_main(["models", "--dir", str(model_dir), "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    cli_default = cli["default"]
    for entry in http["models"]:
        entry["default"] = entry["name"] == cli_default
        entry["packed"] = False  # `lyrics models` only lists: it does not pack what it loads
    assert cli["models"] == http["models"]
    assert set(cli["skipped"]) == {"broken.safetensors"}


async def test_one_model(client):
    r = await client.get("/models/rnn")
    assert r.status_code == 200
    assert r.json()["name"] == "rnn" and r.json()["default"] is False and r.json()["cell"] == "rnn"


@pytest.mark.parametrize("name", ["lstm", "broken", "gru.safetensors", "..%2Fgru", "%00"])
async def test_unknown_model_is_404(client, name):
    error = assert_error(await client.get(f"/models/{name}"), 404)
    assert error["type"] in {"model_not_found", "not_found"}


async def test_default_is_the_lowest_validation_perplexity(make_client, model_dir):
    expected = load_directory(model_dir).default
    async with make_client(Settings(model_dir=model_dir, device="cpu")) as (_, client):
        assert (await client.get("/models")).json()["default"] == expected
        assert (await client.post("/generate", json={"prefix": "分开"})).json()["model"] == expected


async def test_default_model_setting(make_client, model_dir):
    async with make_client(Settings(model_dir=model_dir, device="cpu", default_model="rnn")) as (_, client):
        assert (await client.get("/models")).json()["default"] == "rnn"
        assert (await client.post("/generate", json={"prefix": "分开"})).json()["model"] == "rnn"
        assert (await client.post("/perplexity", json={"text": "分开的"})).json()["model"] == "rnn"


async def test_lifespan_logs_what_it_loaded_and_skipped(make_client, settings, caplog):
    caplog.set_level(logging.INFO, logger="app")
    async with make_client(settings):
        pass
    log = caplog.text
    assert "loaded gru: gru 1x32" in log and "loaded rnn: rnn 1x32" in log and "on cpu" in log
    assert "skipped broken.safetensors:" in log and "not a readable safetensors file" in log
    assert "default model: gru" in log


async def start(settings: Settings) -> None:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        pass


async def test_refuses_to_start_without_a_model(tmp_path, caplog):
    with pytest.raises(StartupError, match="no .safetensors file"):
        await start(Settings(model_dir=tmp_path, device="cpu"))
    with pytest.raises(StartupError, match="does not exist"):
        await start(Settings(model_dir=tmp_path / "missing", device="cpu"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(StartupError, match="every checkpoint was skipped"):
        await start(Settings(model_dir=tmp_path, device="cpu"))
    assert "cannot start: no model to serve" in caplog.text


async def test_refuses_an_unloaded_default_model(model_dir):
    with pytest.raises(StartupError, match="LYRICS_DEFAULT_MODEL='lstm'"):
        await start(Settings(model_dir=model_dir, device="cpu", default_model="lstm"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
async def test_refuses_cuda_without_a_gpu(model_dir):
    with pytest.raises(StartupError, match="LYRICS_DEVICE='cuda'"):
        await start(Settings(model_dir=model_dir, device="cuda"))


async def test_refuses_an_invalid_device(model_dir):
    with pytest.raises(StartupError, match="LYRICS_DEVICE='tpu'"):
        await start(Settings(model_dir=model_dir, device="tpu"))


async def test_auto_device_serves_on_cpu_here(make_client, model_dir):
    async with make_client(Settings(model_dir=model_dir, device="auto")) as (_, client):
        expected = "cuda:0" if torch.cuda.is_available() else "cpu"
        assert {m["device"] for m in (await client.get("/models")).json()["models"]} == {expected}
