import json
import os
import pickle
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model_store import checkpoint as ckpt_module
from model_store.checkpoint import (
    FORMAT_VERSION,
    METADATA_KEY,
    CheckpointError,
    atomic_write_bytes,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from model_store.vocab import Vocabulary

PROJECT = Path(__file__).resolve().parents[2]
VOCAB = Vocabulary.from_text("分开的夜里 我唱着歌\nla")
V = len(VOCAB)  # 13
TRAINING = {"corpus_sha256": "ab" * 32, "val_perplexity": 3.25, "command": "lyrics train --prefixes 分开", "epochs": 4}


@pytest.fixture
def gru(make_model):
    return make_model("gru", vocab_size=len(VOCAB), hidden_size=8, num_layers=2, embed_size=4, dropout=0.1)


@pytest.fixture
def saved(tmp_path, gru):
    path = tmp_path / "gru.safetensors"
    save_checkpoint(path, gru, VOCAB, newlines="space", training=TRAINING)
    return path


def write_raw(path, tensors, meta):
    """A safetensors file with exactly these tensors and (unless None) this metadata."""
    metadata = None if meta is None else {METADATA_KEY: json.dumps(meta, ensure_ascii=False)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def good_meta(model):
    return {"format_version": FORMAT_VERSION, "config": model.config.to_dict(), "vocab": VOCAB.as_string(),
            "newlines": "keep", "training": {}}


# Round trip ---------------------------------------------------------------------------------


def test_save_then_load_gives_identical_logits(saved, gru):
    ck = load_checkpoint(saved)
    x = torch.randint(0, len(VOCAB), (2, 9), generator=torch.Generator().manual_seed(0))
    expected, _ = gru(x)
    got, _ = ck.model(x)
    assert torch.equal(got, expected)
    for name, tensor in gru.state_dict().items():
        assert torch.equal(ck.model.state_dict()[name], tensor), name
    assert not ck.model.training  # loaded for inference


def test_metadata_survives_the_round_trip(saved, gru):
    ck = load_checkpoint(saved)
    assert ck.config == gru.config
    assert ck.vocab.idx_to_char == VOCAB.idx_to_char
    assert ck.newlines == "space"
    assert ck.training == TRAINING
    assert ck.path == saved and ck.name == "gru"
    meta = read_metadata(saved)
    assert meta == {"format_version": FORMAT_VERSION, "config": gru.config.to_dict(), "vocab": VOCAB.as_string(),
                    "newlines": "space", "training": TRAINING}


@pytest.mark.parametrize("impl", ["scratch", "fused"])
def test_a_checkpoint_loads_into_either_implementation_with_the_same_logits(saved, gru, impl):
    ck = load_checkpoint(saved, impl=impl)
    assert ck.model.impl == impl
    x = torch.randint(0, len(VOCAB), (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ck.model(x)[0], gru(x)[0], atol=1e-5, rtol=0)


def test_a_one_hot_model_round_trips(tmp_path, make_model):
    model = make_model("lstm", vocab_size=len(VOCAB), hidden_size=8, embed_size=0)
    save_checkpoint(tmp_path / "m.safetensors", model, VOCAB)
    ck = load_checkpoint(tmp_path / "m.safetensors")
    x = torch.arange(len(VOCAB))[None]
    assert torch.equal(ck.model(x)[0], model(x)[0])
    assert ck.newlines == "keep" and ck.training == {}


def test_save_rejects_a_vocabulary_of_the_wrong_size_and_an_unknown_newline_policy(tmp_path, gru):
    with pytest.raises(ValueError, match="vocabulary"):
        save_checkpoint(tmp_path / "x.safetensors", gru, Vocabulary("abc"))
    with pytest.raises(ValueError, match="newlines"):
        save_checkpoint(tmp_path / "x.safetensors", gru, VOCAB, newlines="crlf")
    assert not (tmp_path / "x.safetensors").exists()


# Atomic writes -------------------------------------------------------------------------------


def test_atomic_write_replaces_the_file_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"]


def test_written_files_are_readable_by_other_users(tmp_path):
    path = tmp_path / "m.bin"
    atomic_write_bytes(path, b"x")
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_failed_write_keeps_the_old_file_and_removes_its_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "file.bin"
    atomic_write_bytes(path, b"old")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_module.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_a_checkpoint_interrupted_while_saving_leaves_the_old_checkpoint_loadable(saved, make_model, monkeypatch):
    other = make_model("gru", vocab_size=len(VOCAB), hidden_size=8, num_layers=2, embed_size=4, seed=9)
    before = saved.read_bytes()

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_module.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(saved, other, VOCAB)
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]
    load_checkpoint(saved)


# Every way a file can be wrong -----------------------------------------------------------------


def assert_rejected(path, *words):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert re.search(word, message, re.IGNORECASE), (word, message)
    return message


@pytest.mark.parametrize("keep", [0.5, 0.99, 12, 4, 0])
def test_a_truncated_file_is_rejected(saved, keep):
    raw = saved.read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else keep
    saved.write_bytes(raw[:n])
    assert_rejected(saved, "truncated or corrupt")


def test_random_bytes_are_rejected(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(random.Random(0).randbytes(4096))
    assert_rejected(path, "not a readable safetensors file")


def test_a_pickle_file_is_rejected_without_unpickling_it(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    path.write_bytes(pickle.dumps({"a": 1}))

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint loader must never unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert_rejected(path, "not a readable safetensors file")


def test_a_safetensors_file_without_our_metadata_is_rejected(tmp_path, gru):
    path = write_raw(tmp_path / "plain.safetensors", gru.state_dict(), None)
    assert_rejected(path, "metadata", "not a lyrics checkpoint")
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    assert_rejected(other, "not a lyrics checkpoint")


def test_metadata_that_is_not_json_is_rejected(tmp_path, gru):
    path = tmp_path / "bad.safetensors"
    save_file(dict(gru.state_dict()), str(path), metadata={METADATA_KEY: "{not json"})
    assert_rejected(path, "not valid JSON")


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 0, None, "1"])
def test_an_unsupported_format_version_is_rejected(tmp_path, gru, version):
    meta = good_meta(gru) | {"format_version": version}
    path = write_raw(tmp_path / "v.safetensors", gru.state_dict(), meta)
    assert_rejected(path, "format version", re.escape(repr(version)))


def test_a_file_with_a_good_header_loads(tmp_path, gru):
    """Guards the tests that craft files: the same crafting, unspoilt, gives a loadable file."""
    path = write_raw(tmp_path / "ok.safetensors", gru.state_dict(), good_meta(gru))
    assert load_checkpoint(path).config == gru.config


def test_a_tensor_whose_shape_does_not_match_the_config_is_rejected(tmp_path, gru):
    tensors = dict(gru.state_dict())
    tensors["dense.weight"] = torch.zeros(len(VOCAB), 9)
    path = write_raw(tmp_path / "shape.safetensors", tensors, good_meta(gru))
    assert_rejected(path, "dense.weight", rf"\({V}, 9\)", rf"expected \({V}, 8\)")


def test_a_config_that_does_not_match_the_tensors_is_rejected(tmp_path, gru):
    meta = good_meta(gru)
    meta["config"]["hidden_size"] = 16
    path = write_raw(tmp_path / "config.safetensors", gru.state_dict(), meta)
    assert_rejected(path, "shape")


def test_missing_tensors_are_rejected_and_named(tmp_path, gru):
    tensors = {k: v for k, v in gru.state_dict().items() if k not in ("rnn.bias_hh_l1", "dense.bias")}
    path = write_raw(tmp_path / "missing.safetensors", tensors, good_meta(gru))
    assert_rejected(path, "missing", "rnn.bias_hh_l1", "dense.bias")


def test_unexpected_tensors_are_rejected_and_named(tmp_path, gru):
    tensors = dict(gru.state_dict()) | {"rnn.weight_ih_l7": torch.zeros(3)}
    path = write_raw(tmp_path / "extra.safetensors", tensors, good_meta(gru))
    assert_rejected(path, "unexpected", "rnn.weight_ih_l7")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected(tmp_path, gru, bad):
    tensors = dict(gru.state_dict())
    tensors["rnn.weight_hh_l0"] = tensors["rnn.weight_hh_l0"].clone()
    tensors["rnn.weight_hh_l0"][3, 2] = bad
    path = write_raw(tmp_path / "nan.safetensors", tensors, good_meta(gru))
    assert_rejected(path, "rnn.weight_hh_l0", "NaN or infinite")


def test_integer_tensors_are_rejected(tmp_path, gru):
    tensors = dict(gru.state_dict())
    tensors["dense.bias"] = torch.zeros(len(VOCAB), dtype=torch.int64)
    path = write_raw(tmp_path / "int.safetensors", tensors, good_meta(gru))
    assert_rejected(path, "dense.bias", "dtype")


@pytest.mark.parametrize("change,words", [
    ({"config": {"cell": "transformer", "vocab_size": V}}, ["invalid model config"]),
    ({"config": "gru"}, ["invalid model config"]),
    ({"vocab": "aab"}, ["invalid model config or vocabulary"]),
    ({"vocab": "abc"}, ["vocabulary has 3 characters", f"config says {V}"]),
    ({"newlines": "crlf"}, ["newline policy"]),
    ({"training": [1, 2]}, ["training summary"]),
])
def test_inconsistent_metadata_is_rejected(tmp_path, gru, change, words):
    meta = good_meta(gru) | change
    path = write_raw(tmp_path / "meta.safetensors", gru.state_dict(), meta)
    assert_rejected(path, *words)


def test_a_nonexistent_path_is_rejected(tmp_path):
    assert_rejected(tmp_path / "nowhere.safetensors", "no such checkpoint file")
    assert_rejected(tmp_path, "no such checkpoint file")  # a directory is not a checkpoint file


def test_read_metadata_validates_like_load(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x00" * 3)
    with pytest.raises(CheckpointError):
        read_metadata(path)


# No pickle anywhere ----------------------------------------------------------------------------

FORBIDDEN = re.compile(r"^\s*(import pickle|from pickle import)|torch\.load\(|pickle\.loads?\(|cPickle|dill\b", re.M)


def test_the_project_never_uses_pickle_or_torch_load():
    sources = [p for d in ("app", "model_store", "training", "bench", "scripts") if (PROJECT / d).is_dir()
               for p in (PROJECT / d).rglob("*.py")]
    assert any(p.name == "checkpoint.py" for p in sources)  # the search does look at the code
    offenders = {str(p.relative_to(PROJECT)): FORBIDDEN.findall(p.read_text(encoding="utf-8")) for p in sources}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_pickle_search_would_find_a_use():
    assert FORBIDDEN.search("import os\nimport pickle\n")
    assert FORBIDDEN.search("state = torch.load(path)")
    assert FORBIDDEN.search("x = pickle.loads(b)")
    assert not FORBIDDEN.search("from safetensors.torch import load_file")


def test_checkpoint_files_are_written_without_pickle(saved):
    raw = saved.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])  # a safetensors file: a JSON header then raw tensor bytes
    assert METADATA_KEY in header["__metadata__"]
    assert not raw.startswith(b"\x80")  # pickle protocol 2+ magic
    assert os.path.getsize(saved) == 8 + header_len + sum(
        v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
