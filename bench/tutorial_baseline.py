"""The tutorial's own training code, re-written from its equations and structure: the speed and
perplexity baseline that bench/train_speed.py compares the project against.

Reproduces the "Dive into Deep Learning" RNN chapter (shared/seed/rnn_tutorial_zh.md, sections 2
and 3) and the d2lzh_pytorch helpers it calls (data_iter_random, data_iter_consecutive, sgd):

* the scratch RNN: one-hot input built with `scatter_`, a Python list of per-step one-hot
  matrices, `X @ W_xh + H @ W_hh + b_h` and `Y = H @ W_hq + b_q` per step, normal(0, 0.01)
  weights, `grad_clipping` over the parameter list and `sgd(params, lr, 1)`;
* the concise model: `RNNModel` wrapping a torch.nn layer that is fed the stacked one-hot input,
  with the dense layer applied once over all steps, trained by `train_and_predict_rnn_pytorch`
  with Adam and its `grad_clipping(model.parameters(), ...)` call, which passes a generator: the
  norm loop uses it up, so the clipping loop never runs (kept as the tutorial has it).

Deviation: the tutorial's `one_hot` scatters with the float index tensors that d2l's samplers
yield, which current torch rejects; like d2lzh_pytorch's own `one_hot` it converts to long first.

Timing covers the training batches of each epoch only; prediction (when asked for) runs after the
epoch's clock stops. Run alone for a quick look:
    python bench/tutorial_baseline.py --corpus ../shared/data/jaychou_lyrics.txt --epochs 5
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
from torch import nn


def load_data_jay_lyrics(path, max_chars=10000):
    with open(path, encoding="utf-8") as f:
        corpus_chars = f.read()
    corpus_chars = corpus_chars.replace("\n", " ").replace("\r", " ")
    corpus_chars = corpus_chars[0:max_chars]
    idx_to_char = list(set(corpus_chars))
    char_to_idx = {char: i for i, char in enumerate(idx_to_char)}
    vocab_size = len(char_to_idx)
    corpus_indices = [char_to_idx[char] for char in corpus_chars]
    return corpus_indices, char_to_idx, idx_to_char, vocab_size


def one_hot(x, n_class, dtype=torch.float32):
    x = x.long()  # d2lzh_pytorch's one_hot does this; scatter_ needs an integer index
    result = torch.zeros(x.shape[0], n_class, dtype=dtype, device=x.device)  # shape: (n, n_class)
    result.scatter_(1, x.view(-1, 1), 1)  # result[i, x[i, 0]] = 1
    return result


def to_onehot(X, n_class):
    return [one_hot(X[:, i], n_class) for i in range(X.shape[1])]


# d2lzh_pytorch samplers: random uses Python's global `random`; both yield float32 tensors.

def data_iter_random(corpus_indices, batch_size, num_steps, device=None):
    num_examples = (len(corpus_indices) - 1) // num_steps  # -1: the output index is the input index + 1
    epoch_size = num_examples // batch_size
    example_indices = list(range(num_examples))
    random.shuffle(example_indices)

    def _data(pos):
        return corpus_indices[pos: pos + num_steps]

    for i in range(epoch_size):
        i = i * batch_size
        batch_indices = example_indices[i: i + batch_size]
        X = [_data(j * num_steps) for j in batch_indices]
        Y = [_data(j * num_steps + 1) for j in batch_indices]
        yield (torch.tensor(X, dtype=torch.float32, device=device),
               torch.tensor(Y, dtype=torch.float32, device=device))


def data_iter_consecutive(corpus_indices, batch_size, num_steps, device=None):
    corpus_indices = torch.tensor(corpus_indices, dtype=torch.float32, device=device)
    data_len = len(corpus_indices)
    batch_len = data_len // batch_size
    indices = corpus_indices[0: batch_size * batch_len].view(batch_size, batch_len)
    epoch_size = (batch_len - 1) // num_steps
    for i in range(epoch_size):
        i = i * num_steps
        X = indices[:, i: i + num_steps]
        Y = indices[:, i + 1: i + num_steps + 1]
        yield X, Y


def sgd(params, lr, batch_size):
    for param in params:
        param.data -= lr * param.grad / batch_size


def grad_clipping(params, theta, device):
    norm = torch.tensor([0.0], device=device)
    for param in params:
        norm += (param.grad.data ** 2).sum()
    norm = norm.sqrt().item()
    if norm > theta:
        for param in params:
            param.grad.data *= (theta / norm)


# Section 2: the RNN from scratch.

def make_get_params(num_inputs, num_hiddens, num_outputs, device):
    """The tutorial's `get_params`, which reads these four as globals."""

    def get_params():
        def _one(shape):
            param = torch.zeros(shape, device=device, dtype=torch.float32)
            nn.init.normal_(param, 0, 0.01)
            return torch.nn.Parameter(param)

        W_xh = _one((num_inputs, num_hiddens))
        W_hh = _one((num_hiddens, num_hiddens))
        b_h = torch.nn.Parameter(torch.zeros(num_hiddens, device=device))
        W_hq = _one((num_hiddens, num_outputs))
        b_q = torch.nn.Parameter(torch.zeros(num_outputs, device=device))
        return (W_xh, W_hh, b_h, W_hq, b_q)

    return get_params


def rnn(inputs, state, params):
    # inputs and outputs: num_steps matrices of shape (batch_size, vocab_size)
    W_xh, W_hh, b_h, W_hq, b_q = params
    H, = state
    outputs = []
    for X in inputs:
        H = torch.tanh(torch.matmul(X, W_xh) + torch.matmul(H, W_hh) + b_h)
        Y = torch.matmul(H, W_hq) + b_q
        outputs.append(Y)
    return outputs, (H,)


def init_rnn_state(batch_size, num_hiddens, device):
    return (torch.zeros((batch_size, num_hiddens), device=device),)


def predict_rnn(prefix, num_chars, rnn, params, init_rnn_state, num_hiddens, vocab_size, device, idx_to_char,
                char_to_idx):
    state = init_rnn_state(1, num_hiddens, device)
    output = [char_to_idx[prefix[0]]]
    for t in range(num_chars + len(prefix) - 1):
        X = to_onehot(torch.tensor([[output[-1]]], device=device), vocab_size)
        (Y, state) = rnn(X, state, params)
        if t < len(prefix) - 1:
            output.append(char_to_idx[prefix[t + 1]])
        else:
            output.append(Y[0].argmax(dim=1).item())
    return "".join([idx_to_char[i] for i in output])


def train_and_predict_rnn(rnn, get_params, init_rnn_state, num_hiddens, vocab_size, device, corpus_indices,
                          idx_to_char, char_to_idx, is_random_iter, num_epochs, num_steps, lr, clipping_theta,
                          batch_size, pred_period=None, pred_len=50, prefixes=(), log=print):
    """The tutorial's loop; returns one {perplexity, seconds, chars} dict per epoch."""
    data_iter_fn = data_iter_random if is_random_iter else data_iter_consecutive
    params = get_params()
    loss = nn.CrossEntropyLoss()
    history = []
    for epoch in range(num_epochs):
        if not is_random_iter:  # consecutive sampling: initialise the state at the start of the epoch
            state = init_rnn_state(batch_size, num_hiddens, device)
        l_sum, n, start = 0.0, 0, time.perf_counter()
        data_iter = data_iter_fn(corpus_indices, batch_size, num_steps, device)
        for X, Y in data_iter:
            if is_random_iter:  # random sampling: initialise the state before every minibatch
                state = init_rnn_state(batch_size, num_hiddens, device)
            else:  # otherwise detach it from the graph
                for s in state:
                    s.detach_()
            inputs = to_onehot(X, vocab_size)
            (outputs, state) = rnn(inputs, state, params)
            outputs = torch.cat(outputs, dim=0)  # (num_steps * batch_size, vocab_size)
            y = torch.flatten(Y.T)  # matches the rows of outputs
            l = loss(outputs, y.long())  # noqa: E741

            if params[0].grad is not None:
                for param in params:
                    param.grad.data.zero_()
            l.backward()
            grad_clipping(params, clipping_theta, device)
            sgd(params, lr, 1)  # the loss is already a mean
            l_sum += l.item() * y.shape[0]
            n += y.shape[0]
        seconds = time.perf_counter() - start
        history.append({"perplexity": math.exp(l_sum / n), "seconds": seconds, "chars": n})
        if pred_period and (epoch + 1) % pred_period == 0:
            log(f"epoch {epoch + 1}, perplexity {math.exp(l_sum / n):f}, time {seconds:.2f} sec")
            for prefix in prefixes:
                log(" - " + predict_rnn(prefix, pred_len, rnn, params, init_rnn_state, num_hiddens, vocab_size,
                                        device, idx_to_char, char_to_idx))
    return history


# Section 3: the concise implementation.

class RNNModel(nn.Module):
    def __init__(self, rnn_layer, vocab_size):
        super().__init__()
        self.rnn = rnn_layer
        self.hidden_size = rnn_layer.hidden_size * (2 if rnn_layer.bidirectional else 1)
        self.vocab_size = vocab_size
        self.dense = nn.Linear(self.hidden_size, vocab_size)

    def forward(self, inputs, state):
        # inputs: (batch_size, num_steps)
        X = to_onehot(inputs, self.vocab_size)
        X = torch.stack(X)  # (num_steps, batch_size, vocab_size)
        hiddens, state = self.rnn(X, state)
        hiddens = hiddens.view(-1, hiddens.shape[-1])  # (num_steps * batch_size, hidden_size)
        output = self.dense(hiddens)
        return output, state


def predict_rnn_pytorch(prefix, num_chars, model, vocab_size, device, idx_to_char, char_to_idx):
    state = None
    output = [char_to_idx[prefix[0]]]
    for t in range(num_chars + len(prefix) - 1):
        X = torch.tensor([output[-1]], device=device).view(1, 1)
        (Y, state) = model(X, state)
        if t < len(prefix) - 1:
            output.append(char_to_idx[prefix[t + 1]])
        else:
            output.append(Y.argmax(dim=1).item())
    return "".join([idx_to_char[i] for i in output])


def train_and_predict_rnn_pytorch(model, num_hiddens, vocab_size, device, corpus_indices, idx_to_char, char_to_idx,
                                  num_epochs, num_steps, lr, clipping_theta, batch_size, pred_period=None,
                                  pred_len=50, prefixes=(), log=print):
    """The tutorial's concise loop (consecutive sampling, Adam); returns per-epoch dicts."""
    loss = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.to(device)
    history = []
    for epoch in range(num_epochs):
        l_sum, n, start = 0.0, 0, time.perf_counter()
        data_iter = data_iter_consecutive(corpus_indices, batch_size, num_steps, device)
        state = None
        for X, Y in data_iter:
            if state is not None:
                if isinstance(state, tuple):  # LSTM, state: (h, c)
                    state[0].detach_()
                    state[1].detach_()
                else:
                    state.detach_()
            (output, state) = model(X, state)  # output: (num_steps * batch_size, vocab_size)
            y = torch.flatten(Y.T)
            l = loss(output, y.long())  # noqa: E741

            optimizer.zero_grad()
            l.backward()
            grad_clipping(model.parameters(), clipping_theta, device)  # a generator: never clips, as in the tutorial
            optimizer.step()
            l_sum += l.item() * y.shape[0]
            n += y.shape[0]
        seconds = time.perf_counter() - start
        history.append({"perplexity": math.exp(l_sum / n), "seconds": seconds, "chars": n})
        if pred_period and (epoch + 1) % pred_period == 0:
            log(f"epoch {epoch + 1}, perplexity {math.exp(l_sum / n):f}, time {seconds:.2f} sec")
            for prefix in prefixes:
                log(" - " + predict_rnn_pytorch(prefix, pred_len, model, vocab_size, device, idx_to_char,
                                                char_to_idx))
    return history


# Entry points used by train_speed.py.

def run_scratch_rnn(corpus_path, epochs, seed=0, num_hiddens=256, num_steps=35, batch_size=32, lr=1e2,
                    clipping_theta=1e-2, max_chars=10000, pred_period=None, log=print):
    """Section 2's run: scratch RNN, random sampling, SGD."""
    device = torch.device("cpu")
    corpus_indices, char_to_idx, idx_to_char, vocab_size = load_data_jay_lyrics(corpus_path, max_chars)
    random.seed(seed)
    torch.manual_seed(seed)
    get_params = make_get_params(vocab_size, num_hiddens, vocab_size, device)
    return train_and_predict_rnn(rnn, get_params, init_rnn_state, num_hiddens, vocab_size, device, corpus_indices,
                                 idx_to_char, char_to_idx, True, epochs, num_steps, lr, clipping_theta, batch_size,
                                 pred_period, 50, ["分开", "不分开"], log)


def run_concise(corpus_path, epochs, cell="gru", seed=0, num_hiddens=256, num_steps=35, batch_size=32, lr=1e-2,
                clipping_theta=1e-2, max_chars=10000, pred_period=None, log=print):
    """Section 3's run: RNNModel around nn.RNN/nn.GRU/nn.LSTM fed one-hot input, consecutive sampling, Adam."""
    device = torch.device("cpu")
    corpus_indices, char_to_idx, idx_to_char, vocab_size = load_data_jay_lyrics(corpus_path, max_chars)
    random.seed(seed)
    torch.manual_seed(seed)
    layer = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cell](input_size=vocab_size, hidden_size=num_hiddens)
    model = RNNModel(layer, vocab_size).to(device)
    return train_and_predict_rnn_pytorch(model, num_hiddens, vocab_size, device, corpus_indices, idx_to_char,
                                         char_to_idx, epochs, num_steps, lr, clipping_theta, batch_size, pred_period,
                                         50, ["分开", "不分开"], log)


def main():
    parser = argparse.ArgumentParser(description="Train the tutorial's scratch RNN or concise GRU.")
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--model", choices=["scratch-rnn", "concise-gru"], default="scratch-rnn")
    parser.add_argument("--pred-period", type=int, default=None, help="print samples every N epochs")
    args = parser.parse_args()
    if args.model == "scratch-rnn":
        history = run_scratch_rnn(args.corpus, args.epochs, pred_period=args.pred_period)
    else:
        history = run_concise(args.corpus, args.epochs, "gru", pred_period=args.pred_period)
    for i, h in enumerate(history, 1):
        print(f"epoch {i}: perplexity {h['perplexity']:.2f}, {h['chars'] / h['seconds']:,.0f} chars/s")


if __name__ == "__main__":
    main()
