import math

import pytest
import torch
import torch.nn.functional as F

from model_store import scoring
from model_store.scoring import score_ids, score_text
from model_store.vocab import UnknownCharactersError, Vocabulary

VOCAB = Vocabulary("abcdefghij")
TEXT = "abcabcdefg" * 4 + "hijjihgfed" * 3  # 70 characters


@pytest.fixture
def model(make_model):
    return make_model("gru", vocab_size=len(VOCAB), hidden_size=12, embed_size=0, std=0.4, seed=5)


def manual_cross_entropy(model, ids: list[int]) -> float:
    x = torch.tensor(ids)
    with torch.no_grad():
        logits, _ = model(x[None])
    return F.cross_entropy(logits[0, :-1], x[1:]).item()


def test_cross_entropy_equals_one_forward_pass_over_the_whole_text(model):
    s = score_text(model, VOCAB, TEXT)
    assert s.cross_entropy == pytest.approx(manual_cross_entropy(model, VOCAB.encode(TEXT)), rel=1e-5)
    assert s.chars_scored == len(TEXT) - 1
    assert s.unknown_skipped == 0


def test_perplexity_is_exp_cross_entropy_and_bits_are_nats_over_ln_2(model):
    s = score_text(model, VOCAB, TEXT)
    assert s.perplexity == pytest.approx(math.exp(s.cross_entropy), rel=1e-12)
    assert s.bits_per_char == pytest.approx(s.cross_entropy / math.log(2), rel=1e-12)
    assert 1.0 < s.perplexity < 1e4


def test_a_trained_model_scores_its_own_lyric_far_better_than_chance(trained, lyric):
    s = score_text(trained.model, trained.vocab, lyric * 2)
    assert s.perplexity < 2.0 < len(trained.vocab)


@pytest.mark.parametrize("window", [1, 7, 69, 70])
def test_windowed_scoring_equals_one_window(model, monkeypatch, window):
    whole = score_text(model, VOCAB, TEXT)
    monkeypatch.setattr(scoring, "WINDOW", window)
    windowed = score_text(model, VOCAB, TEXT)
    assert windowed.cross_entropy == pytest.approx(whole.cross_entropy, rel=1e-5)
    assert windowed.chars_scored == whole.chars_scored


def test_the_state_matters_across_windows(model):
    """Guards the windowed test: restarting the state every 7 characters would change the score."""
    ids = torch.tensor(VOCAB.encode(TEXT))
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 7):
            x, y = ids[start:start + 7], ids[start + 1:start + 8]
            logits, _ = model(x[: len(y)][None])
            total += F.cross_entropy(logits[0], y, reduction="sum").item()
    restarted = total / (len(ids) - 1)
    assert abs(restarted - score_text(model, VOCAB, TEXT).cross_entropy) > 1e-3


def test_score_ids_accepts_a_tensor_and_keeps_the_models_mode(model):
    model.train()
    s = score_ids(model, torch.tensor(VOCAB.encode(TEXT)))
    assert model.training
    model.eval()
    assert s.cross_entropy == pytest.approx(score_text(model, VOCAB, TEXT).cross_entropy, rel=1e-6)


def test_scoring_runs_in_eval_mode_so_dropout_does_not_change_the_score(make_model):
    model = make_model("lstm", vocab_size=len(VOCAB), hidden_size=12, num_layers=2, embed_size=4, dropout=0.5)
    model.train()
    scores = {score_text(model, VOCAB, TEXT).cross_entropy for _ in range(3)}
    assert len(scores) == 1


def test_unknown_characters_raise_by_default_naming_them(model):
    with pytest.raises(UnknownCharactersError) as info:
        score_text(model, VOCAB, "abcXdeY龙X")
    assert info.value.unknown == ["X", "Y", "龙"]


def test_unknown_skip_drops_and_counts_them(model):
    noisy = "abcXdeY龙X" + TEXT
    s = score_text(model, VOCAB, noisy, unknown="skip")
    clean = score_text(model, VOCAB, "abcde" + TEXT)
    assert s.unknown_skipped == 4
    assert s.chars_scored == clean.chars_scored == len("abcde" + TEXT) - 1
    assert s.cross_entropy == pytest.approx(clean.cross_entropy, rel=1e-6)


def test_an_unknown_policy_other_than_error_or_skip_is_rejected(model):
    with pytest.raises(ValueError, match="unknown"):
        score_text(model, VOCAB, TEXT, unknown="ignore")


@pytest.mark.parametrize("text", ["a", "", "X", "aXY"])
def test_a_text_with_fewer_than_two_scorable_characters_is_rejected(model, text):
    with pytest.raises(ValueError, match="two characters"):
        score_text(model, VOCAB, text, unknown="skip")


def test_two_characters_are_enough(model):
    s = score_text(model, VOCAB, "ab")
    assert s.chars_scored == 1
    assert s.cross_entropy == pytest.approx(manual_cross_entropy(model, VOCAB.encode("ab")), rel=1e-6)


def manual_nll(model, ids: list[int]) -> list[float]:
    """Each character's nll from one forward pass over the whole text (character 0 has none)."""
    x = torch.tensor(ids)
    with torch.no_grad():
        logits, _ = model(x[None])
    return F.cross_entropy(logits[0, :-1], x[1:], reduction="none").tolist()


def test_per_char_covers_every_character_and_its_mean_is_the_cross_entropy(model):
    s = score_text(model, VOCAB, TEXT, per_char=True)
    assert "".join(c.char for c in s.per_char) == TEXT
    assert s.per_char[0].nll is None  # nothing before it to predict it from
    scored = [c.nll for c in s.per_char[1:]]
    assert None not in scored and len(scored) == s.chars_scored
    assert sum(scored) / len(scored) == pytest.approx(s.cross_entropy, rel=1e-12)
    assert scored == pytest.approx(manual_nll(model, VOCAB.encode(TEXT)), rel=1e-5)


def test_per_char_bits_are_nats_over_ln_2(model):
    s = score_text(model, VOCAB, "abcde", per_char=True)
    assert s.per_char[0].nll_bits is None
    assert all(c.nll_bits == pytest.approx(c.nll / math.log(2), rel=1e-12) for c in s.per_char[1:])


def test_per_char_is_off_unless_asked(model):
    s = score_text(model, VOCAB, TEXT)
    assert s.per_char is None and s.nll is None


@pytest.mark.parametrize("window", [1, 7, 70])
def test_windowed_per_char_equals_one_window(model, monkeypatch, window):
    whole = [c.nll for c in score_text(model, VOCAB, TEXT, per_char=True).per_char[1:]]
    monkeypatch.setattr(scoring, "WINDOW", window)
    windowed = [c.nll for c in score_text(model, VOCAB, TEXT, per_char=True).per_char[1:]]
    assert windowed == pytest.approx(whole, rel=1e-5)


def test_skipped_unknown_characters_have_no_nll_and_the_rest_score_as_the_clean_text(model):
    noisy = "XabcY龙de" + TEXT
    s = score_text(model, VOCAB, noisy, unknown="skip", per_char=True)
    clean = score_text(model, VOCAB, "abcde" + TEXT, per_char=True)
    assert "".join(c.char for c in s.per_char) == noisy
    assert [c.nll for c in s.per_char if c.char in "XY龙"] == [None, None, None]
    assert s.per_char[1].nll is None  # 'a', the first known character, has nothing before it
    kept = [c.nll for c in s.per_char if c.char not in "XY龙"]
    assert kept[0] is None and kept[1:] == pytest.approx([c.nll for c in clean.per_char[1:]], rel=1e-6)
    scored = [c.nll for c in s.per_char if c.nll is not None]
    assert len(scored) == s.chars_scored and sum(scored) / len(scored) == pytest.approx(s.cross_entropy, rel=1e-12)
