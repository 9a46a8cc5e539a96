"""The Kneser-Ney n-gram against a plain re-statement of its definition, and its storage."""

import math
import random
from collections import Counter

import numpy as np
import pytest
import torch

from model_store.ngram import KneserNey, modified_discounts

TEXT = [int(c) for c in "0120120341203412012056012"]  # ids over a vocabulary of 9 (7 and 8 never occur)
VOCAB = 9


def reference_prob(ids, order, vocab, history, w):
    """Interpolated modified Kneser-Ney, recomputed from the text for every query: raw counts at the
    top order, continuation counts (distinct left neighbours) below, the uniform distribution last."""
    def counts(k):  # table of order k + 1: context of length k -> Counter of next ids
        table = {}
        if k == order - 1:
            for i in range(k, len(ids)):
                table.setdefault(tuple(ids[i - k:i]), Counter())[ids[i]] += 1
        else:
            for gram in {tuple(ids[i - k - 1:i + 1]) for i in range(k + 1, len(ids))}:
                table.setdefault(gram[1:-1], Counter())[gram[-1]] += 1
        return table

    p = 1 / vocab
    for k in range(order):
        table = counts(k)
        ctx = tuple(history[len(history) - k:]) if k else ()
        if k > len(history) or ctx not in table:
            break
        d = modified_discounts([c for nxt in table.values() for c in nxt.values()])
        nxt = table[ctx]
        total = sum(nxt.values())
        gamma = sum(d[min(c, 3) - 1] for c in nxt.values()) / total
        p = max(nxt[w] - d[min(nxt[w], 3) - 1], 0) / total + gamma * p if nxt[w] else gamma * p
    return p


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_probabilities_equal_the_definition_recomputed_from_the_text(order):
    model = KneserNey.fit(TEXT, order, VOCAB)
    rng = random.Random(order)
    for _ in range(40):
        history = [rng.randrange(7) for _ in range(rng.randrange(0, 6))]
        for w in range(VOCAB):
            assert model.prob(history, w) == pytest.approx(reference_prob(TEXT, order, VOCAB, history, w), rel=1e-9)


@pytest.mark.parametrize("history", [[], [0], [1, 2], [3, 4, 1, 2], [6, 6, 6], [8]])
def test_distribution_sums_to_one_and_agrees_with_prob(history):
    model = KneserNey.fit(TEXT, 4, VOCAB)
    dist = model.distribution(history)
    assert dist.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(dist, [model.prob(history, w) for w in range(VOCAB)], rtol=1e-12)


def test_characters_never_seen_still_get_probability_but_less_than_seen_ones():
    model = KneserNey.fit(TEXT, 3, VOCAB)
    dist = model.distribution([0, 1])
    assert dist[7] > 0 and dist[8] > 0
    assert dist[2] > 0.5  # "0 1" is always followed by "2" in the text
    assert dist[7] < dist[3]


def test_a_higher_order_predicts_the_repeating_text_better():
    text = [int(c) for c in "0123" * 10 + "0213" * 10]
    log_likelihood = {order: sum(KneserNey.fit(text, order, 4).log_probs(text)) for order in (1, 2, 3)}
    assert log_likelihood[1] < log_likelihood[2] < log_likelihood[3]


def test_discounts_follow_chen_and_goodman():
    counts = [1] * 10 + [2] * 4 + [3] * 2 + [4] * 1 + [9] * 5
    y = 10 / (10 + 2 * 4)
    assert modified_discounts(counts) == pytest.approx((1 - 2 * y * 4 / 10, 2 - 3 * y * 2 / 4, 3 - 4 * y * 1 / 2))


def test_tables_round_trip_through_tensors():
    model = KneserNey.fit(TEXT, 4, VOCAB)
    tensors = model.to_tensors()
    assert all(t.dtype in (torch.int32, torch.int64) for t in tensors.values())
    again = KneserNey.from_tensors(tensors)
    for history in ([], [0, 1], [2, 0, 3], [5]):
        assert np.array_equal(again.distribution(history), model.distribution(history))


def test_tables_with_ids_outside_the_vocabulary_are_refused():
    tensors = KneserNey.fit(TEXT, 2, VOCAB).to_tensors()
    tensors["ngram.1.next"][0] = VOCAB
    with pytest.raises(ValueError, match="outside the vocabulary"):
        KneserNey.from_tensors(tensors)


def test_log_probs_score_every_position_after_start():
    model = KneserNey.fit(TEXT, 3, VOCAB)
    scores = model.log_probs(TEXT, start=1)
    assert len(scores) == len(TEXT) - 1
    assert scores[4] == pytest.approx(math.log(model.prob(TEXT[3:5], TEXT[5])))


@pytest.mark.parametrize("order", [1, 3, 5])
def test_distributions_of_many_contexts_equal_distribution_row_by_row(order, monkeypatch):
    model = KneserNey.fit(TEXT, order, VOCAB)
    width = max(order - 1, 0)
    rng = random.Random(order)
    rows = [[-1] * width] + [[-1] * (width - n) + [rng.choice(TEXT + [7]) for _ in range(n)]
                            for n in range(width + 1) for _ in range(4)]  # unseen contexts too (7 never occurs)
    contexts = torch.tensor(rows, dtype=torch.int32).reshape(len(rows), width)
    expected = np.stack([model.distribution([i for i in row if i >= 0]) for row in rows]).astype(np.float32)
    assert torch.equal(model.distributions(contexts), torch.from_numpy(expected))  # in C where it is built
    monkeypatch.setattr("model_store.kernels.ENABLED", False)
    assert torch.equal(model.distributions(contexts), torch.from_numpy(expected))
