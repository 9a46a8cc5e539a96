import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.batches import data_iter_consecutive, data_iter_random, num_batches

CORPUS = list(range(1000, 1103))  # 103 distinct "character ids": a value tells its position


def tutorial_data_iter_random(corpus_indices, batch_size, num_steps, rng):
    """d2l's data_iter_random, with `random.shuffle` taken from a given Random."""
    num_examples = (len(corpus_indices) - 1) // num_steps
    epoch_size = num_examples // batch_size
    example_indices = list(range(num_examples))
    rng.shuffle(example_indices)

    def _data(pos):
        return corpus_indices[pos: pos + num_steps]

    for i in range(epoch_size):
        i = i * batch_size
        batch_indices = example_indices[i: i + batch_size]
        X = [_data(j * num_steps) for j in batch_indices]
        Y = [_data(j * num_steps + 1) for j in batch_indices]
        yield torch.tensor(X), torch.tensor(Y)


def tutorial_data_iter_consecutive(corpus_indices, batch_size, num_steps):
    """d2l's data_iter_consecutive."""
    corpus_indices = torch.tensor(corpus_indices)
    data_len = len(corpus_indices)
    batch_len = data_len // batch_size
    indices = corpus_indices[0: batch_size * batch_len].view(batch_size, batch_len)
    epoch_size = (batch_len - 1) // num_steps
    for i in range(epoch_size):
        i = i * num_steps
        X = indices[:, i: i + num_steps]
        Y = indices[:, i + 1: i + num_steps + 1]
        yield X, Y


def position(v: int) -> int:
    return v - CORPUS[0]


SIZES = [(4, 5), (3, 7), (8, 10), (1, 1), (5, 9)]


# Random sampling ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size,num_steps", SIZES)
def test_random_sampling_is_the_tutorials(batch_size, num_steps):
    ours = list(data_iter_random(CORPUS, batch_size, num_steps, random.Random(3)))
    theirs = list(tutorial_data_iter_random(CORPUS, batch_size, num_steps, random.Random(3)))
    assert len(ours) == len(theirs) == ((len(CORPUS) - 1) // num_steps) // batch_size
    for (x, y), (tx, ty) in zip(ours, theirs, strict=True):
        assert torch.equal(x, tx) and torch.equal(y, ty)


@pytest.mark.parametrize("batch_size,num_steps", SIZES)
def test_random_batches_are_non_overlapping_aligned_chunks_each_used_at_most_once(batch_size, num_steps):
    batches = list(data_iter_random(CORPUS, batch_size, num_steps, random.Random(0)))
    starts = Counter()
    for X, Y in batches:
        assert X.shape == Y.shape == (batch_size, num_steps)
        assert X.dtype == Y.dtype == torch.long
        assert torch.equal(Y[:, :-1], X[:, 1:])
        assert torch.equal(Y, X + 1)  # each target is the character after its input
        for row in X.tolist():
            start = position(row[0])
            assert start % num_steps == 0
            assert row == CORPUS[start:start + num_steps]
            starts[start] += 1
    assert all(count == 1 for count in starts.values())
    assert len(starts) == len(batches) * batch_size


def test_random_sampling_order_depends_on_the_rng_only():
    a = [x for x, _ in data_iter_random(CORPUS, 4, 5, random.Random(1))]
    b = [x for x, _ in data_iter_random(CORPUS, 4, 5, random.Random(1))]
    c = [x for x, _ in data_iter_random(CORPUS, 4, 5, random.Random(2))]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))


def test_random_sampling_never_reads_past_the_end():
    # 21 characters, num_steps 5: 4 examples, the last one's target ends at the last character
    corpus = CORPUS[:21]
    batches = list(data_iter_random(corpus, 1, 5, random.Random(0)))
    assert len(batches) == 4
    assert max(int(y.max()) for _, y in batches) == corpus[-1]
    # 20 characters: only 3 examples fit, as the last target would need a 21st
    assert len(list(data_iter_random(CORPUS[:20], 1, 5, random.Random(0)))) == 3


# Consecutive sampling -----------------------------------------------------------------------


@pytest.mark.parametrize("batch_size,num_steps", SIZES)
def test_consecutive_sampling_is_the_tutorials(batch_size, num_steps):
    ours = list(data_iter_consecutive(CORPUS, batch_size, num_steps))
    theirs = list(tutorial_data_iter_consecutive(CORPUS, batch_size, num_steps))
    assert len(ours) == len(theirs) == (len(CORPUS) // batch_size - 1) // num_steps
    for (x, y), (tx, ty) in zip(ours, theirs, strict=True):
        assert torch.equal(x, tx) and torch.equal(y, ty)


@pytest.mark.parametrize("batch_size,num_steps", SIZES)
def test_consecutive_batches_continue_each_row_where_the_last_batch_ended(batch_size, num_steps):
    batches = list(data_iter_consecutive(CORPUS, batch_size, num_steps))
    assert batches
    batch_len = len(CORPUS) // batch_size
    for k, (X, Y) in enumerate(batches):
        assert X.shape == Y.shape == (batch_size, num_steps)
        assert torch.equal(Y[:, :-1], X[:, 1:])
        assert torch.equal(Y, X + 1)
        for r in range(batch_size):
            assert position(int(X[r, 0])) == r * batch_len + k * num_steps
    for (X, _), (X_next, _) in zip(batches, batches[1:], strict=False):
        assert torch.equal(X_next[:, 0], X[:, -1] + 1)


# num_batches --------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 300), batch_size=st.integers(1, 12), num_steps=st.integers(1, 40))
def test_num_batches_agrees_with_the_iterators(n, batch_size, num_steps):
    corpus = list(range(n))
    randoms = sum(1 for _ in data_iter_random(corpus, batch_size, num_steps, random.Random(0)))
    consecutive = sum(1 for _ in data_iter_consecutive(corpus, batch_size, num_steps))
    if n > batch_size:
        assert num_batches(n, batch_size, num_steps, "random") == randoms
        assert num_batches(n, batch_size, num_steps, "consecutive") == consecutive
    assert num_batches(n, batch_size, num_steps, "random") < 1 or randoms >= 1
    assert num_batches(n, batch_size, num_steps, "consecutive") < 1 or consecutive >= 1


@pytest.mark.parametrize("n,sampling", [(3, "consecutive"), (0, "random")])
def test_num_batches_is_never_negative(n, sampling):
    corpus = list(range(n))
    if sampling == "random":
        actual = sum(1 for _ in data_iter_random(corpus, 4, 5, random.Random(0)))
    else:
        actual = sum(1 for _ in data_iter_consecutive(corpus, 4, 5))
    assert actual == 0
    assert num_batches(n, 4, 5, sampling) == actual


def test_batches_land_on_the_requested_device():
    x, y = next(data_iter_consecutive(CORPUS, 2, 3, device="cpu"))
    assert x.device.type == y.device.type == "cpu"
    x, y = next(data_iter_random(CORPUS, 2, 3, random.Random(0), device=torch.device("cpu")))
    assert x.device.type == y.device.type == "cpu"
