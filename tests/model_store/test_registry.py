from pathlib import Path

import pytest
import torch

from model_store.checkpoint import save_checkpoint
from model_store.registry import checkpoint_paths, load_directory, resolve, resolve_device
from model_store.vocab import Vocabulary

VOCAB = Vocabulary("abcdef")


@pytest.fixture
def model_dir(tmp_path, make_model):
    model = make_model("rnn", vocab_size=len(VOCAB), hidden_size=4)
    save_checkpoint(tmp_path / "worse.safetensors", model, VOCAB, training={"val_perplexity": 5.0})
    save_checkpoint(tmp_path / "better.safetensors", model, VOCAB, training={"val_perplexity": 2.5})
    save_checkpoint(tmp_path / "unscored.safetensors", model, VOCAB, training={})
    (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01garbage")
    (tmp_path / ".hidden.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a model")
    return tmp_path


def test_load_directory_loads_the_good_files_and_reports_the_broken_ones(model_dir):
    loaded = load_directory(model_dir)
    assert sorted(loaded.models) == ["better", "unscored", "worse"]
    assert list(loaded.skipped) == ["broken.safetensors"]
    assert "not a readable safetensors file" in loaded.skipped["broken.safetensors"]


def test_the_default_model_has_the_lowest_validation_perplexity(model_dir):
    assert load_directory(model_dir).default == "better"


def test_models_without_a_validation_perplexity_come_last(model_dir):
    (model_dir / "better.safetensors").unlink()
    (model_dir / "worse.safetensors").unlink()
    assert load_directory(model_dir).default == "unscored"


def test_an_empty_or_missing_directory_has_no_models(tmp_path):
    assert load_directory(tmp_path).models == {}
    assert load_directory(tmp_path).default is None
    assert checkpoint_paths(tmp_path / "missing") == []


def test_hidden_and_foreign_files_are_not_checkpoints(model_dir):
    names = [p.name for p in checkpoint_paths(model_dir)]
    assert names == ["better.safetensors", "broken.safetensors", "unscored.safetensors", "worse.safetensors"]


def test_resolve_maps_a_name_into_the_directory_and_leaves_paths_alone(tmp_path):
    assert resolve("gru", tmp_path) == tmp_path / "gru.safetensors"
    assert resolve("elsewhere/gru.safetensors", tmp_path) == Path("elsewhere/gru.safetensors")
    assert resolve("x.safetensors", tmp_path) == Path("x.safetensors")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")
