import math
import random

import pytest

from model_store.scoring import CharNLL, score_text
from model_store.surprisal import surprisal_json, surprising_spans
from model_store.vocab import Vocabulary


def chars(text: str, nlls: list[float | None]) -> list[CharNLL]:
    return [CharNLL(c, v) for c, v in zip(text, nlls, strict=True)]


def window_total(per_char, start: int, length: int) -> float:
    return sum(c.nll or 0.0 for c in per_char[start:start + length])


def test_the_spans_are_the_highest_totals_most_surprising_first_never_overlapping():
    per_char = chars("abcdefgh", [None, 1, 5, 1, 0.5, 4, 4, 0.1])
    spans = surprising_spans(per_char, k=3, length=2)
    assert [(s.start, s.end, s.text, s.nats, s.chars_scored) for s in spans] == [
        (5, 7, "fg", 8.0, 2), (1, 3, "bc", 6.0, 2), (3, 5, "de", 1.5, 2)]
    assert spans[0].bits == pytest.approx(8.0 / math.log(2))
    assert spans[0].mean_nats == 4.0


def test_unscored_characters_count_nothing_and_a_span_of_only_those_is_never_chosen():
    per_char = chars("XabY", [None, None, 2.0, None])
    spans = surprising_spans(per_char, k=5, length=1)
    assert [(s.text, s.nats, s.chars_scored) for s in spans] == [("b", 2.0, 1)]
    assert spans[0].mean_nats == 2.0


def test_on_a_tie_the_earlier_span_wins():
    spans = surprising_spans(chars("abcd", [None, 1.0, 1.0, 1.0]), k=1, length=1)
    assert spans[0].start == 1


def test_a_span_longer_than_the_text_is_the_whole_text_and_k_0_is_none():
    per_char = chars("abc", [None, 1.0, 2.0])
    assert [(s.start, s.end, s.text) for s in surprising_spans(per_char, k=3, length=10)] == [(0, 3, "abc")]
    assert surprising_spans(per_char, k=0) == []


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        surprising_spans(chars("ab", [None, 1.0]), k=1, length=0)


@pytest.mark.parametrize("seed", range(20))
def test_greedy_choice_against_every_window(seed):
    """No chosen span overlaps another, the first is the best window, and every window left out
    overlaps a chosen span or is no more surprising than the last one chosen."""
    rng = random.Random(seed)
    n, k, length = rng.randint(1, 40), rng.randint(1, 5), rng.randint(1, 6)
    per_char = chars("x" * n, [None if rng.random() < 0.2 else rng.random() * 5 for _ in range(n)])
    spans = surprising_spans(per_char, k, length)
    length = min(length, n)
    starts = [s for s in range(n - length + 1) if any(c.nll is not None for c in per_char[s:s + length])]
    assert len(spans) <= k
    for i, a in enumerate(spans):
        assert a.nats == pytest.approx(window_total(per_char, a.start, length))
        assert all(a.end <= b.start or b.end <= a.start for b in spans[i + 1:])
    if starts:
        assert spans[0].nats == pytest.approx(max(window_total(per_char, s, length) for s in starts))
    for s in starts:
        if all(s + length <= c.start or c.end <= s for c in spans):
            assert len(spans) == k and window_total(per_char, s, length) <= spans[-1].nats + 1e-12


def test_the_json_has_every_character_and_the_spans_in_nats_and_bits(make_model):
    vocab = Vocabulary("abcdef")
    model = make_model("rnn", vocab_size=len(vocab), hidden_size=8, embed_size=0, std=0.5, seed=1)
    score = score_text(model, vocab, "abcXdefabc", unknown="skip", per_char=True)
    body = surprisal_json(score, top_spans=2, span_chars=3)
    assert [c["char"] for c in body["per_char"]] == list("abcXdefabc")
    assert body["per_char"][0] == {"char": "a", "nll": None, "nll_bits": None}
    assert body["per_char"][3]["nll"] is None
    b = body["per_char"][1]
    assert b["nll"] > 0 and b["nll_bits"] == pytest.approx(b["nll"] / math.log(2))
    assert len(body["surprising_spans"]) == 2
    top = body["surprising_spans"][0]
    assert set(top) == {"start", "end", "text", "nats", "bits", "mean_nats", "mean_bits", "chars_scored"}
    assert top["text"] == "abcXdefabc"[top["start"]:top["end"]] and top["end"] - top["start"] == 3
    assert top["bits"] == pytest.approx(top["nats"] / math.log(2))
    assert top["mean_nats"] == pytest.approx(top["nats"] / top["chars_scored"])


def test_the_json_needs_a_per_char_score(make_model):
    vocab = Vocabulary("ab")
    model = make_model("rnn", vocab_size=2, hidden_size=4, embed_size=0)
    with pytest.raises(ValueError, match="per_char"):
        surprisal_json(score_text(model, vocab, "abab"))
