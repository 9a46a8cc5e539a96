import hashlib

import pytest

from model_store.vocab import normalise_newlines as normalise
from training.corpus import CorpusError, load_corpus


def write(tmp_path, data: bytes, name="c.txt"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_windows_and_old_mac_line_endings_become_newlines():
    assert normalise("a\r\nb\rc\nd") == "a\nb\nc\nd"
    assert normalise("\r\n\r\r\n") == "\n\n\n"


def test_the_space_policy_turns_every_line_break_into_one_space():
    assert normalise("分开\r\n不分开\rla\nla", "space") == "分开 不分开 la la"


def test_an_unknown_newline_policy_is_rejected():
    with pytest.raises(ValueError, match="newlines"):
        normalise("abc", "drop")


def test_load_corpus_applies_normalisation_and_policy(tmp_path):
    path = write(tmp_path, "分开\r\n不分开\rla\n".encode())
    kept = load_corpus(path, val_frac=0.0)
    assert kept.text == "分开\n不分开\nla\n"
    assert kept.file_chars == len(kept.text)
    spaced = load_corpus(path, newlines="space", val_frac=0.0)
    assert spaced.text == "分开 不分开 la "
    assert "\n" not in spaced.vocab


def test_a_utf8_byte_order_mark_is_not_part_of_the_text(tmp_path):
    path = write(tmp_path, b"\xef\xbb\xbf" + "分开的夜".encode())
    corpus = load_corpus(path, val_frac=0.0)
    assert corpus.text == "分开的夜"


def test_max_chars_truncates_after_normalisation(tmp_path, corpus_text):
    path = write(tmp_path, corpus_text.replace("\n", "\r\n").encode())
    corpus = load_corpus(path, max_chars=25, val_frac=0.2)
    assert corpus.text == corpus_text[:25]
    assert len(corpus.train_ids) + len(corpus.val_ids) == 25
    assert corpus.file_chars == len(corpus_text)  # the whole file, before truncation


def test_max_chars_below_two_is_rejected(corpus_file):
    with pytest.raises(CorpusError, match="max-chars"):
        load_corpus(corpus_file, max_chars=1)


@pytest.mark.parametrize("val_frac", [0.0, 0.1, 0.25, 0.5])
def test_the_split_is_contiguous_with_the_last_fraction_for_validation(corpus_file, corpus_text, val_frac):
    corpus = load_corpus(corpus_file, val_frac=val_frac)
    n_val = int(len(corpus_text) * val_frac)
    assert len(corpus.val_ids) == n_val
    assert corpus.vocab.decode(corpus.train_ids) == corpus_text[: len(corpus_text) - n_val]
    assert corpus.vocab.decode(corpus.val_ids) == corpus_text[len(corpus_text) - n_val:]
    assert corpus.train_ids + corpus.val_ids == corpus.vocab.encode(corpus_text)


@pytest.mark.parametrize("val_frac", [-0.1, 1.0, 1.5])
def test_a_validation_fraction_outside_0_to_1_is_rejected(corpus_file, val_frac):
    with pytest.raises(CorpusError, match="val-frac"):
        load_corpus(corpus_file, val_frac=val_frac)


def test_the_vocabulary_covers_the_whole_truncated_text_including_validation(tmp_path):
    # 'z' and '龙' appear only in the validation part; 'q' only after the truncation point
    path = write(tmp_path, ("ab" * 20 + "z龙" + "q").encode())
    corpus = load_corpus(path, val_frac=0.1, max_chars=42)
    assert corpus.vocab.idx_to_char == ["a", "b", "z", "龙"]
    assert "z" in corpus.vocab.decode(corpus.val_ids)
    assert "z" not in corpus.vocab.decode(corpus.train_ids)


def test_sha256_is_of_the_file_bytes(tmp_path, corpus_text):
    raw = corpus_text.replace("\n", "\r\n").encode()
    path = write(tmp_path, raw)
    corpus = load_corpus(path, newlines="space", max_chars=10)
    assert corpus.sha256 == hashlib.sha256(raw).hexdigest()
    assert corpus.sha256 != hashlib.sha256(corpus.text.encode()).hexdigest()


@pytest.mark.parametrize("data", [b"", b"x", b"\xef\xbb\xbf", b"\xef\xbb\xbfa"])
def test_an_empty_or_one_character_corpus_is_rejected(tmp_path, data):
    with pytest.raises(CorpusError, match="empty"):
        load_corpus(write(tmp_path, data))


def test_a_missing_file_is_rejected(tmp_path):
    with pytest.raises(CorpusError, match="cannot read corpus") as info:
        load_corpus(tmp_path / "nope.txt")
    assert "nope.txt" in str(info.value)


def test_a_directory_is_rejected(tmp_path):
    with pytest.raises(CorpusError, match="cannot read corpus"):
        load_corpus(tmp_path)


@pytest.mark.parametrize("data", ["分开".encode("gbk"), b"abc\xff\xfe", "分开".encode("utf-16")])
def test_a_non_utf8_file_is_rejected(tmp_path, data):
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_corpus(write(tmp_path, data))
