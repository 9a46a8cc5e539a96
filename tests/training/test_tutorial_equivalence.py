"""The project's training loop runs the tutorial's algorithms, not just similar ones.

The tutorial's two training loops are written out below as the tutorial writes them (one-hot
input, its samplers, its clipping, SGD or Adam) and run beside `training.train` from the same
initial weights, vocabulary order and sampler seed: the per-epoch perplexities must agree to
float32 rounding. The project runs its own code throughout (the scratch cells, the C kernels
and their products, the fused loss), so a change that alters the arithmetic of training shows
up here, where a test against the project's own torch-op path would not.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.corpus import load_corpus
from training.train import setup, train_epoch

HIDDEN, STEPS, BATCH, EPOCHS = 32, 8, 4, 3


def tutorial_consecutive(ids, batch_size, num_steps):
    data = torch.tensor(ids)
    batch_len = len(data) // batch_size
    indices = data[0: batch_size * batch_len].view(batch_size, batch_len)
    for i in range((batch_len - 1) // num_steps):
        i = i * num_steps
        yield indices[:, i: i + num_steps], indices[:, i + 1: i + num_steps + 1]


def tutorial_random(ids, batch_size, num_steps, rng):
    num_examples = (len(ids) - 1) // num_steps
    example_indices = list(range(num_examples))
    rng.shuffle(example_indices)
    for i in range(num_examples // batch_size):
        starts = example_indices[i * batch_size: (i + 1) * batch_size]
        yield (torch.tensor([ids[j * num_steps: j * num_steps + num_steps] for j in starts]),
               torch.tensor([ids[j * num_steps + 1: j * num_steps + 1 + num_steps] for j in starts]))


def tutorial_concise_gru(ids, vocab_size, seed, lr=0.01):
    """Section 3: nn.GRU on one-hot input, a dense layer, Adam, consecutive sampling, no clipping
    (the tutorial's clipping is handed a one-shot generator and never clips)."""
    torch.manual_seed(seed)
    gru, dense = nn.GRU(input_size=vocab_size, hidden_size=HIDDEN), nn.Linear(HIDDEN, vocab_size)
    optimizer = torch.optim.Adam([*gru.parameters(), *dense.parameters()], lr=lr)
    perplexities = []
    for _ in range(EPOCHS):
        state, l_sum, n = None, 0.0, 0
        for X, Y in tutorial_consecutive(ids, BATCH, STEPS):
            if state is not None:
                state.detach_()
            Y_hat, state = gru(F.one_hot(X.T, vocab_size).float(), state)
            output = dense(Y_hat.reshape(-1, HIDDEN))
            y = torch.flatten(Y.T)
            loss = F.cross_entropy(output, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            l_sum, n = l_sum + loss.item() * y.shape[0], n + y.shape[0]
        perplexities.append(math.exp(l_sum / n))
    return perplexities


def tutorial_scratch_rnn(ids, vocab_size, params, seed, lr=100.0, theta=0.01):
    """Section 2: H = tanh(X W_xh + H W_hh + b_h), one bias; random sampling, a fresh state every
    batch; gradient clipping to a global norm of theta; SGD."""
    W_xh, W_hh, b_h, W_hq, b_q = params = [p.clone().requires_grad_() for p in params]
    rng, perplexities = random.Random(seed), []
    for _ in range(EPOCHS):
        l_sum, n = 0.0, 0
        for X, Y in tutorial_random(ids, BATCH, STEPS, rng):
            H, outputs = torch.zeros(BATCH, HIDDEN), []
            for x in F.one_hot(X.T, vocab_size).float():
                H = torch.tanh(x @ W_xh + H @ W_hh + b_h)
                outputs.append(H @ W_hq + b_q)
            y = torch.flatten(Y.T)
            loss = F.cross_entropy(torch.cat(outputs), y)
            for p in params:
                p.grad = None
            loss.backward()
            with torch.no_grad():
                norm = math.sqrt(sum((p.grad ** 2).sum().item() for p in params))
                for p in params:
                    if norm > theta:
                        p.grad *= theta / norm
                    p -= lr * p.grad
            l_sum, n = l_sum + loss.item() * y.shape[0], n + y.shape[0]
        perplexities.append(math.exp(l_sum / n))
    return perplexities


def project(cfg, corpus, initial=None):
    model, optimizer, rng = setup(cfg, corpus, torch.device("cpu"))
    if initial is not None:
        with torch.no_grad():
            for name, value in initial.items():
                model.get_parameter(name).copy_(value)
    return [math.exp(train_epoch(model, optimizer, corpus, cfg, rng, torch.device("cpu"))[0]) for _ in range(EPOCHS)]


@pytest.mark.parametrize("seed", [0, 1])
def test_the_gru_trains_as_the_tutorials_concise_gru(corpus_file, tiny_train_config, tmp_path, seed):
    cfg = tiny_train_config(corpus_file, tmp_path / "m.safetensors", cell="gru", embed_size=0, hidden_size=HIDDEN,
                            num_steps=STEPS, batch_size=BATCH, epochs=EPOCHS, optimizer="adam", lr=0.01, clip=0.0,
                            sampling="consecutive", val_frac=0.0, seed=seed)
    corpus = load_corpus(cfg.corpus, cfg.newlines, cfg.val_frac)
    # the same seed draws the same initial weights: nn.GRU, then the dense layer, in both
    expected = tutorial_concise_gru(corpus.train_ids, len(corpus.vocab), seed)
    assert project(cfg, corpus) == pytest.approx(expected, rel=1e-4)
    assert expected[-1] < expected[0] / 2  # it learnt something


def test_the_single_bias_rnn_trains_as_the_tutorials_scratch_rnn(corpus_file, tiny_train_config, tmp_path):
    cfg = tiny_train_config(corpus_file, tmp_path / "m.safetensors", cell="rnn", embed_size=0, hidden_size=HIDDEN,
                            num_steps=STEPS, batch_size=BATCH, epochs=EPOCHS, optimizer="sgd", lr=100.0, clip=0.01,
                            sampling="random", val_frac=0.0, single_bias=True, seed=3)
    corpus = load_corpus(cfg.corpus, cfg.newlines, cfg.val_frac)
    V, g = len(corpus.vocab), torch.Generator().manual_seed(0)
    W_xh, W_hh, W_hq = (torch.randn(shape, generator=g) * 0.01 for shape in [(V, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, V)])
    b_h, b_q = torch.zeros(HIDDEN), torch.zeros(V)
    expected = tutorial_scratch_rnn(corpus.train_ids, V, [W_xh, W_hh, b_h, W_hq, b_q], seed=3)
    # torch's layout stores the transposes, and the second bias b_hh stays zero
    initial = {"rnn.weight_ih_l0": W_xh.T, "rnn.weight_hh_l0": W_hh.T, "rnn.bias_ih_l0": b_h,
               "dense.weight": W_hq.T, "dense.bias": b_q}
    assert project(cfg, corpus, initial) == pytest.approx(expected, rel=1e-4)
    assert expected[-1] < expected[0]
