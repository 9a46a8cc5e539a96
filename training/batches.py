"""The tutorial's two minibatch samplers over a sequence of character indices.

Both yield (X, Y) of shape (batch_size, num_steps) where Y is X shifted one character
to the right: the target at every position is the character that follows the input.

Random sampling cuts the corpus into non-overlapping examples of num_steps characters
and draws them in a shuffled order; neighbouring rows are unrelated, so the state is
re-initialised every batch::

    corpus   a b c d e f g h i j k l m ...      num_steps = 3
    examples [a b c] [d e f] [g h i] [j k l]     Y of [a b c] is [b c d]
    batch 1  X = [g h i]    Y = [h i j]
                 [a b c]        [b c d]

Consecutive sampling lays the corpus out as batch_size long rows and walks along them
num_steps at a time; row r of batch k+1 continues row r of batch k, so the state is
carried across batches (and detached, to bound backpropagation)::

    corpus   a b c d e f g h i j k l             batch_size = 2, num_steps = 2
    rows     a b c d e f                         batch 1  X = [a b]  Y = [b c]
             g h i j k l                                      [g h]      [h i]
                                                 batch 2  X = [c d]  Y = [d e]
                                                              [i j]      [j k]
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def data_iter_random(corpus_indices: Sequence[int], batch_size: int, num_steps: int,
                     rng: random.Random, device=None) -> Iterator[Batch]:
    num_examples = (len(corpus_indices) - 1) // num_steps  # -1: the last Y needs one more character
    epoch_size = num_examples // batch_size
    example_indices = list(range(num_examples))
    rng.shuffle(example_indices)
    data = torch.as_tensor(corpus_indices, dtype=torch.long)
    for i in range(epoch_size):
        batch = torch.tensor(example_indices[i * batch_size:(i + 1) * batch_size]) * num_steps
        offsets = batch[:, None] + torch.arange(num_steps)[None, :]
        yield data[offsets].to(device), data[offsets + 1].to(device)


def data_iter_consecutive(corpus_indices: Sequence[int], batch_size: int, num_steps: int,
                          device=None) -> Iterator[Batch]:
    data = torch.as_tensor(corpus_indices, dtype=torch.long)
    batch_len = len(data) // batch_size
    rows = data[: batch_size * batch_len].view(batch_size, batch_len)
    epoch_size = (batch_len - 1) // num_steps
    for i in range(epoch_size):
        i *= num_steps
        yield rows[:, i:i + num_steps].to(device), rows[:, i + 1:i + num_steps + 1].to(device)


def num_batches(n_chars: int, batch_size: int, num_steps: int, sampling: str) -> int:
    if sampling == "random":
        return max(0, ((n_chars - 1) // num_steps) // batch_size)
    return max(0, (n_chars // batch_size - 1) // num_steps)
