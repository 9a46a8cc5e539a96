"""Shared fixtures: small made-up lyric corpora, tiny models and one tiny trained checkpoint.

Nothing here reads the real corpus: every text is written below. Torch runs on one
thread: the models are tiny, and on a shared 2-core machine extra threads only wait on
each other.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from model_store.checkpoint import load_checkpoint
from model_store.model import CharLM, ModelConfig
from training.train import TrainConfig, paths_for, train

torch.set_num_threads(1)

# A made-up lyric: Chinese and English, line breaks, spaces, repeated characters.
LYRIC = (
    "分开的夜里 我唱着歌\n"
    "不分开的风 吹过山坡\n"
    "la la love you baby\n"
    "我想就这样陪你走到海边\n"
    "爱可不可以像星星一样明亮\n"
)
CORPUS_TEXT = LYRIC * 12  # 804 characters, 43 distinct


@pytest.fixture(scope="session")
def lyric() -> str:
    return LYRIC


@pytest.fixture(scope="session")
def corpus_text() -> str:
    return CORPUS_TEXT


@pytest.fixture
def corpus_file(tmp_path) -> Path:
    path = tmp_path / "lyrics.txt"
    path.write_text(CORPUS_TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def session_corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "lyrics.txt"
    path.write_text(CORPUS_TEXT, encoding="utf-8")
    return path


def _tiny_train_config(corpus: Path, out: Path, **overrides) -> TrainConfig:
    cfg = TrainConfig(corpus=str(corpus), cell="rnn", out=str(out), hidden_size=16, num_steps=8, batch_size=4,
                      epochs=2, lr=0.01, progress=False, sample_every=0, val_frac=0.1)
    return replace(cfg, **overrides)


@pytest.fixture(scope="session")
def tiny_train_config():
    """Factory: a TrainConfig small enough to train in well under a second."""
    return _tiny_train_config


@pytest.fixture(scope="session")
def trained(tmp_path_factory, session_corpus_file):
    """One tiny one-hot RNN trained (8 epochs, hidden 32) on the made-up corpus, made once per session.

    The corpus is periodic, so the model learns it well: its logits are far from ties and
    its greedy continuation is the lyric itself."""
    out = tmp_path_factory.mktemp("trained") / "rnn.safetensors"
    cfg = _tiny_train_config(session_corpus_file, out, hidden_size=32, num_steps=10, batch_size=8, epochs=8, lr=0.02)
    logs: list[str] = []
    result = train(cfg, log=logs.append)
    ck = load_checkpoint(out)
    return SimpleNamespace(cfg=cfg, result=result, paths=paths_for(out), path=out, checkpoint=ck,
                           model=ck.model, vocab=ck.vocab, logs=logs)


@pytest.fixture(scope="session")
def make_model():
    """Factory: a CharLM with seeded random weights drawn with a chosen std (a larger std
    than torch's default init spreads the logits, so greedy choices are not near-ties)."""
    def make(cell="rnn", vocab_size=12, hidden_size=16, num_layers=1, embed_size=0, dropout=0.0,
             impl="auto", std: float | None = 0.5, seed=0) -> CharLM:
        torch.manual_seed(seed)
        model = CharLM(ModelConfig(cell=cell, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers,
                                   embed_size=embed_size, dropout=dropout), impl=impl)
        if std is not None:
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0.0, std)
        return model.eval()
    return make
