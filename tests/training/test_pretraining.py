"""Pretraining on the chinese-poetry archive, then fine-tuning with --init-from (a tiny fake archive)."""

import io
import json
import tarfile

import pytest
import torch

from lyrics_cli import main
from model_store.checkpoint import load_checkpoint, read_metadata
from model_store.model import CharLM, ModelConfig
from model_store.vocab import Vocabulary
from training.poetry import build, lyric_lines
from training.train import TrainConfig, initialise_from, train

LYRICS = "我们的爱 在风里\n你说的话 我都记得\n" * 6 + "回到那天 你在身边\n"  # last 10%: the validation text
SONGCI = [{"author": "甲", "paragraphs": ["风里的爱，我们记得。", "你说（正末唱）那天，在身边！"]},
          {"author": "乙", "paragraphs": ["天边的月，照我心。", "月明人静；远山深。"]},
          {"author": "丁", "paragraphs": ["风里的天，我们的爱。"]}]
YUANQU = [{"author": "丙", "paragraphs": ["我们的话，都在“风”里。"]}]


def fake_archive(path, files):
    with tarfile.open(path, "w:gz") as archive:
        for name, poems in files.items():
            data = json.dumps(poems, ensure_ascii=False).encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def archive(tmp_path):
    return fake_archive(tmp_path / "chinese-poetry-2.0.1.tgz", {
        "package/dist/songci/ci.song.0.json": SONGCI,
        "package/dist/songci/author.song.json": [{"name": "甲", "paragraphs": ["不是词"]}],
        "package/dist/yuanqu/yuanqu.json": YUANQU,
        "package/dist/quantangshi/poet.tang.0.json": [{"paragraphs": ["不读这里。"]}]})


@pytest.fixture
def lyrics_file(tmp_path):
    path = tmp_path / "lyrics.txt"
    path.write_text(LYRICS, encoding="utf-8")
    return path


def test_a_poem_becomes_lines_laid_out_like_lyrics():
    assert lyric_lines(["风里的爱，我们记得。", "你说（正末唱）那天、在身边！"]) == ["风里的爱 我们记得", "你说那天 在身边"]
    assert lyric_lines(["“好”——月明……人静；", "(注)"]) == ["好月明人静"]


def test_build_keeps_lines_made_of_the_lyric_training_characters_and_the_most_frequent_others(archive, lyrics_file,
                                                                                               tmp_path):
    out = tmp_path / "poetry.txt"
    record = build(archive, out, lyrics_file, extra_chars=0, command="lyrics poetry-corpus ...")
    lines = out.read_text(encoding="utf-8").splitlines()
    # 天/边/身 occur only in the lyric corpus's validation part, so lines with them are dropped; 月/明/照... are
    # in no lyric at all; the other collections and the author list are never read
    assert lines == ["风里的爱 我们记得", "我们的话 都在风里"]
    assert record["lines_read"] == 7 and record["lines_kept"] == 2 and record["parts"] == ["songci", "yuanqu"]
    assert json.loads((tmp_path / "poetry.txt.source.json").read_text(encoding="utf-8")) == record
    # one extra character: the commonest outside the lyrics' training part (天, three times)
    build(archive, out, lyrics_file, extra_chars=1, parts=["songci"])
    assert out.read_text(encoding="utf-8").splitlines() == ["风里的爱 我们记得", "风里的天 我们的爱"]


def test_build_names_what_is_wrong_with_a_bad_archive(lyrics_file, tmp_path, capsys):
    (tmp_path / "not.tgz").write_bytes(b"not an archive")
    assert main(["poetry-corpus", "--package", str(tmp_path / "not.tgz"), "--out", str(tmp_path / "o.txt"),
                 "--vocab-from", str(lyrics_file)]) == 2
    assert "npm archive of chinese-poetry" in capsys.readouterr().err
    empty = fake_archive(tmp_path / "empty.tgz", {"package/dist/other.json": []})
    assert main(["poetry-corpus", "--package", str(empty), "--out", str(tmp_path / "o.txt"),
                 "--vocab-from", str(lyrics_file)]) == 2
    assert "holds no JSON file" in capsys.readouterr().err


def tiny(corpus, out, **options):
    base = dict(corpus=str(corpus), cell="gru", out=str(out), hidden_size=16, embed_size=16, tie_weights=True,
                num_steps=4, batch_size=2, epochs=1, lr=0.01, sample_every=0, progress=False)
    return TrainConfig(**{**base, **options})


def test_fine_tuning_starts_from_the_pretrained_weights_matched_by_character(archive, lyrics_file, tmp_path):
    poetry = tmp_path / "poetry.txt"
    build(archive, poetry, lyrics_file, extra_chars=10, command="lyrics poetry-corpus --package x")
    train(tiny(poetry, tmp_path / "pre.safetensors"), log=lambda m: None)
    pre = load_checkpoint(tmp_path / "pre.safetensors")
    assert pre.training["corpus_source"]["command"] == "lyrics poetry-corpus --package x"

    lyric_vocab = Vocabulary.from_text(LYRICS)
    torch.manual_seed(0)
    model = CharLM(ModelConfig(cell="gru", vocab_size=len(lyric_vocab), hidden_size=16, embed_size=16,
                               tie_weights=True))
    fresh = model.embedding.weight.detach().clone()
    shared = initialise_from(model, lyric_vocab, str(tmp_path / "pre.safetensors"))
    assert shared["chars_shared"] + shared["chars_new"] == len(lyric_vocab) and shared["chars_new"] > 0
    for i, c in enumerate(lyric_vocab.idx_to_char):
        if c in pre.vocab:
            j = pre.vocab.char_to_idx[c]
            assert torch.equal(model.embedding.weight[i], pre.model.embedding.weight[j])
            assert torch.equal(model.dense.bias[i], pre.model.dense.bias[j])
        else:
            assert torch.equal(model.embedding.weight[i], fresh[i])
    assert torch.equal(model.rnn.weight_hh_l0, pre.model.rnn.weight_hh_l0)

    # the run's checkpoint records the pretraining's own summary, so the whole recipe is in its metadata
    train(tiny(lyrics_file, tmp_path / "fine.safetensors", init_from=str(tmp_path / "pre.safetensors"),
               command="lyrics train --init-from pre"), log=lambda m: None)
    meta = read_metadata(tmp_path / "fine.safetensors")["training"]
    assert meta["options"]["init_from"] == str(tmp_path / "pre.safetensors")
    assert meta["init_from"]["corpus_source"]["command"] == "lyrics poetry-corpus --package x"
    assert len(load_checkpoint(tmp_path / "fine.safetensors").vocab) == len(lyric_vocab)


def test_one_hot_models_copy_the_input_weights_columns_by_character(lyrics_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("我们在风里说话\n" * 20, encoding="utf-8")
    train(tiny(other, tmp_path / "pre.safetensors", embed_size=0, tie_weights=False), log=lambda m: None)
    pre = load_checkpoint(tmp_path / "pre.safetensors")
    vocab = Vocabulary.from_text(LYRICS)
    model = CharLM(ModelConfig(cell="gru", vocab_size=len(vocab), hidden_size=16))
    initialise_from(model, vocab, str(tmp_path / "pre.safetensors"))
    i, j = vocab.char_to_idx["风"], pre.vocab.char_to_idx["风"]
    assert torch.equal(model.rnn.weight_ih_l0[:, i], pre.model.rnn.weight_ih_l0[:, j])
    assert torch.equal(model.dense.weight[i], pre.model.dense.weight[j])


def test_init_from_another_architecture_exits_2_naming_the_difference(lyrics_file, tmp_path, capsys):
    train(tiny(lyrics_file, tmp_path / "pre.safetensors"), log=lambda m: None)
    code = main(["train", "--corpus", str(lyrics_file), "--cell", "lstm", "--out", str(tmp_path / "x.safetensors"),
                 "--hidden-size", "16", "--num-steps", "4", "--batch-size", "2",
                 "--init-from", str(tmp_path / "pre.safetensors"), "--no-progress"])
    assert code == 2
    assert "another architecture: cell 'gru' (this run: 'lstm')" in capsys.readouterr().err
