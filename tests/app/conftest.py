"""Fixtures for the service tests: two tiny models trained once per session on a made-up
corpus (seconds), an in-process app with its lifespan run, and an httpx client on it."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from model_store.checkpoint import Checkpoint
from model_store.registry import load_directory
from training.train import TrainConfig, train

CORPUS = ("分开的爱 我不要\n你说这一句 像雨后的街道\n手中的铅笔 画着远方的船\n"
          "我用几行字写下风的方向\n窗外的燕子 在屋檐下唱歌\n") * 24


@pytest.fixture(scope="session")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """gru (newlines kept, embedding) and rnn (newlines as spaces, one-hot), plus a broken file."""
    root = tmp_path_factory.mktemp("models")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    models = root / "models"
    for cell, newlines, embed in (("gru", "keep", 16), ("rnn", "space", 0)):
        train(TrainConfig(corpus=str(corpus), cell=cell, out=str(models / f"{cell}.safetensors"), hidden_size=32,
                          embed_size=embed, epochs=3, batch_size=4, num_steps=10, newlines=newlines, seed=0,
                          progress=False, sample_every=0), log=lambda _: None)
    for by_product in models.glob("*.*"):
        if not by_product.name.endswith(".safetensors"):
            by_product.unlink()
    (models / "broken.safetensors").write_bytes(b"not a checkpoint")
    return models


@pytest.fixture(scope="session")
def checkpoints(model_dir) -> dict[str, Checkpoint]:
    """The same models loaded directly as the service loads them (packed weights), to compare the
    service's answers with model_store's."""
    return load_directory(model_dir, "cpu", pack=True).models


@pytest.fixture
def settings(model_dir) -> Settings:
    return Settings(model_dir=model_dir, device="cpu", default_model="gru")


@asynccontextmanager
async def in_process(settings: Settings):
    """An app built from `settings`, its lifespan entered, and an httpx client on it."""
    app = create_app(settings)
    transport = httpx.ASGITransport(app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield app, c


@pytest.fixture
async def app_client(settings):
    async with in_process(settings) as app_and_client:
        yield app_and_client


@pytest.fixture
async def client(app_client) -> httpx.AsyncClient:
    return app_client[1]


@pytest.fixture(scope="session")
def make_client():
    """`async with make_client(settings) as (app, client)`: an app with settings of the test's own."""
    return in_process
