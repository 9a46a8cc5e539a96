import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_store.vocab import UnknownCharactersError, Vocabulary, one_hot


def test_vocabulary_is_the_sorted_distinct_characters_of_the_text(lyric):
    vocab = Vocabulary.from_text(lyric)
    assert vocab.idx_to_char == sorted(set(lyric))
    assert len(vocab) == len(set(lyric))
    assert vocab.char_to_idx == {c: i for i, c in enumerate(sorted(set(lyric)))}
    assert vocab.as_string() == "".join(sorted(set(lyric)))


def test_vocabulary_index_order_does_not_depend_on_text_order():
    assert Vocabulary.from_text("cba\n").idx_to_char == ["\n", "a", "b", "c"]
    assert Vocabulary.from_text("abc\n").idx_to_char == Vocabulary.from_text("\ncab").idx_to_char


def test_encode_then_decode_gives_the_text_back(lyric):
    vocab = Vocabulary.from_text(lyric)
    ids = vocab.encode(lyric)
    assert len(ids) == len(lyric)
    assert all(0 <= i < len(vocab) for i in ids)
    assert [vocab.idx_to_char[i] for i in ids] == list(lyric)
    assert vocab.decode(ids) == lyric


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_round_trip_holds_for_any_text(text):
    vocab = Vocabulary.from_text(text)
    assert vocab.decode(vocab.encode(text)) == text
    assert vocab.idx_to_char == sorted(set(text))


def test_unknown_characters_error_names_them_in_order_of_first_appearance():
    vocab = Vocabulary.from_text("分开的 abc")
    with pytest.raises(UnknownCharactersError) as info:
        vocab.encode("a龙bXc龙Y分X")
    err = info.value
    assert err.unknown == ["龙", "X", "Y"]
    message = str(err)
    for c in ("'龙'", "'X'", "'Y'"):
        assert c in message
    assert message.index("'龙'") < message.index("'X'") < message.index("'Y'")
    assert isinstance(err, ValueError)


def test_unknown_lists_each_missing_character_once_and_nothing_for_known_text():
    vocab = Vocabulary.from_text("abc")
    assert vocab.unknown("zzyazx") == ["z", "y", "x"]
    assert vocab.unknown("cab") == []
    assert "a" in vocab and "z" not in vocab


def test_a_long_unknown_list_is_shortened_in_the_message_but_complete_in_the_attribute():
    unknown = [chr(0x4E00 + i) for i in range(25)]
    err = UnknownCharactersError(unknown)
    assert err.unknown == unknown
    assert "(+5 more)" in str(err)
    assert repr(unknown[19]) in str(err) and repr(unknown[20]) not in str(err)


def test_vocabulary_rejects_duplicate_or_multi_character_entries():
    with pytest.raises(ValueError, match="distinct"):
        Vocabulary(["a", "b", "a"])
    with pytest.raises(ValueError, match="one character"):
        Vocabulary(["a", "bc"])


def test_sha256_identifies_the_character_set():
    assert Vocabulary.from_text("abc").sha256() == Vocabulary.from_text("cba").sha256()
    assert Vocabulary.from_text("abc").sha256() != Vocabulary.from_text("abd").sha256()


def test_one_hot_is_the_tutorials():
    x = torch.tensor([0, 2, 3, 2])
    got = one_hot(x, 5)
    expected = torch.tensor([[1, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0],
                             [0, 0, 0, 1, 0],
                             [0, 0, 1, 0, 0]], dtype=torch.float32)
    assert got.dtype == torch.float32
    assert got.shape == (4, 5)
    assert torch.equal(got, expected)
    assert torch.equal(one_hot(x, 5), torch.eye(5)[x])
    assert one_hot(x, 5, dtype=torch.float64).dtype == torch.float64
