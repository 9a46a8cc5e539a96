"""Hostile or broken model files and hostile model names: each is refused with a reason, the good models keep serving."""

from __future__ import annotations

import json
import logging
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import app.served
import model_store.checkpoint
from app.settings import Settings
from model_store.checkpoint import METADATA_KEY, read_metadata
from model_store.registry import load_directory
from tests.app.api_helpers import assert_error

pytestmark = pytest.mark.anyio


class Harmless:
    """Pickled into a fake model file; the test fails if anything ever unpickles it."""


@pytest.fixture
def hostile_dir(model_dir, tmp_path):
    """gru and rnn, an in-directory link to gru, and one file for each way a model file can be bad."""
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    good = model_dir / "gru.safetensors"
    for name in ("gru", "rnn"):
        shutil.copy(model_dir / f"{name}.safetensors", models / f"{name}.safetensors")
    (models / "alias.safetensors").symlink_to("gru.safetensors")
    data = good.read_bytes()
    (models / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with safe_open(good, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = {METADATA_KEY: json.dumps(read_metadata(good))}
    save_file({**tensors, "dense.bias": torch.zeros(3)}, models / "wrong_shape.safetensors", metadata=meta)
    save_file(tensors, models / "no_metadata.safetensors")
    (models / "pickled.safetensors").write_bytes(pickle.dumps(Harmless()))
    shutil.copy(good, outside / "valid_but_outside.safetensors")  # a good model: refused only for where it lies
    (models / "escape.safetensors").symlink_to(outside / "valid_but_outside.safetensors")
    return models


REASONS = {"truncated.safetensors": "truncated or corrupt", "wrong_shape.safetensors": "has shape",
           "no_metadata.safetensors": "no 'lyrics' metadata", "pickled.safetensors": "not a readable safetensors",
           "escape.safetensors": "outside the model directory"}


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle a model file")
    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, refuse)


def test_the_registry_refuses_each_bad_file_with_its_reason(hostile_dir, no_unpickling):
    loaded = load_directory(hostile_dir)
    assert sorted(loaded.models) == ["alias", "gru", "rnn"]
    assert set(loaded.skipped) == set(REASONS)
    for name, reason in REASONS.items():
        assert reason in loaded.skipped[name], (name, loaded.skipped[name])
    assert "outside" not in loaded.skipped["escape.safetensors"].replace("outside the model directory", "")


async def test_the_service_starts_logs_each_refusal_and_serves_the_good_models(make_client, hostile_dir, caplog,
                                                                              no_unpickling):
    caplog.set_level(logging.INFO, logger="app")
    async with make_client(Settings(model_dir=hostile_dir, device="cpu", default_model="gru")) as (_, client):
        assert [m["name"] for m in (await client.get("/models")).json()["models"]] == ["alias", "gru", "rnn"]
        for model in ("gru", "rnn", "alias"):
            r = await client.post("/generate", json={"prefix": "分开", "max_chars": 4, "model": model})
            assert r.status_code == 200, r.text
        for name, reason in REASONS.items():
            assert_error(await client.get(f"/models/{name.removesuffix('.safetensors')}"), 404, "model_not_found")
            assert any(name in rec.message and reason in rec.message and rec.levelname == "WARNING"
                       for rec in caplog.records), name


TRAVERSAL_PATHS = ["/models/..%2Fgru", "/models/%2e%2e%2fgru", "/models/%2e%2e", "/models/%2E%2E%2F%2E%2E",
                   "/models/..%2F..%2Fetc%2Fpasswd", "/models/gru.safetensors", "/models/%2Fetc%2Fpasswd"]
TRAVERSAL_NAMES = ["../gru", "..", "%2e%2e%2fgru", "../../etc/passwd", "gru.safetensors", "/etc/passwd", "./gru"]


@pytest.fixture
def no_file_access(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a request touched the model files")
    monkeypatch.setattr(model_store.checkpoint, "safe_open", refuse)
    monkeypatch.setattr(app.served, "load_checkpoint", refuse)


async def test_model_names_that_look_like_paths_get_404_without_touching_files(app_client, model_dir, no_file_access):
    _, client = app_client
    for path in TRAVERSAL_PATHS:
        r = await client.get(path)
        assert assert_error(r, 404)["type"] in ("not_found", "model_not_found")
        assert str(model_dir) not in r.text and "safetensors file" not in r.text, (path, r.text)
    names = TRAVERSAL_NAMES + [str(model_dir / "gru.safetensors")]
    for name in names:
        for endpoint, body in (("/generate", {"prefix": "分开", "max_chars": 2}), ("/perplexity", {"text": "分开的爱"})):
            r = await client.post(endpoint, json={**body, "model": name})
            error = assert_error(r, 404, "model_not_found")
            assert error["message"].startswith("no model named") and "loaded models: gru, rnn" in error["message"]
