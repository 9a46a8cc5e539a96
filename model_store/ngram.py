"""An interpolated modified Kneser-Ney character n-gram (Chen & Goodman, 1998).

The count-based baseline the recurrent models are measured against, and the second
component of a mixture model (see mixture.py). For an order-N model:

    p_N(w | h) = max(c(h w) - D_N(c), 0) / c(h)  +  gamma(h) * p_{N-1}(w | h[1:])
    gamma(h)   = (D_1 * n_1(h) + D_2 * n_2(h) + D_3+ * n_3+(h)) / c(h)

where n_j(h) counts the characters seen after h exactly j times (3+: three or more).
The top order uses raw counts; every lower order uses continuation counts (how many
distinct characters precede the n-gram), which is what makes it Kneser-Ney. The lowest
order interpolates with the uniform distribution over the whole vocabulary, so a
character never seen in training still gets gamma / V. A context never seen backs off
entirely to the order below. The three discounts per order come from the counts of
counts: Y = n1 / (n1 + 2 n2), D1 = 1 - 2Y n2/n1, D2 = 2 - 3Y n3/n2, D3+ = 3 - 4Y n4/n3.

Stored without pickle: `to_tensors` flattens the tables into integer arrays for a
safetensors file, `from_tensors` rebuilds them.
"""

from __future__ import annotations

import functools
import math
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np
import torch

from model_store import kernels


class Context:
    """What one order knows about one context: the discounted counts of the characters seen
    after it, their total, and the weight gamma left for the order below."""

    __slots__ = ("adjusted", "total", "gamma", "ids", "values")

    def __init__(self, counts: dict[int, int], discounts: tuple[float, float, float]):
        self.total = float(sum(counts.values()))
        self.adjusted = {w: max(c - discounts[min(c, 3) - 1], 0.0) / self.total for w, c in counts.items()}
        by_count = Counter(min(c, 3) for c in counts.values())
        self.gamma = sum(discounts[j - 1] * by_count[j] for j in (1, 2, 3)) / self.total
        self.ids = np.fromiter(self.adjusted.keys(), dtype=np.int64, count=len(self.adjusted))
        self.values = np.fromiter(self.adjusted.values(), dtype=np.float64, count=len(self.adjusted))


def modified_discounts(counts: list[int]) -> tuple[float, float, float]:
    """Chen & Goodman's estimates from the counts of counts, clamped to a usable range when
    a tiny corpus leaves some count-of-counts at zero."""
    n = Counter(c for c in counts if c <= 4)
    n1, n2, n3, n4 = n[1], n[2], n[3], n[4]
    if n1 == 0 or n2 == 0:
        return (0.5, 1.0, 1.5)
    y = n1 / (n1 + 2 * n2)
    d1 = 1 - 2 * y * n2 / n1
    d2 = 2 - 3 * y * n3 / n2
    d3 = 3 - 4 * y * n4 / n3 if n3 else 1.5
    return (min(max(d1, 0.05), 1.0), min(max(d2, 0.05), 2.0), min(max(d3, 0.05), 3.0))


class KneserNey:
    """An order-N character model over a fixed vocabulary of `vocab_size` ids."""

    def __init__(self, order: int, vocab_size: int, counts: list[dict[tuple, dict[int, int]]]):
        if order < 1:
            raise ValueError(f"order must be at least 1, not {order}")
        self.order, self.vocab_size, self.counts = order, vocab_size, counts
        self.discounts = [modified_discounts([c for nxt in table.values() for c in nxt.values()])
                          for table in counts]
        # tables[k]: contexts of length k (order k + 1)
        self.tables = [{ctx: Context(nxt, self.discounts[k]) for ctx, nxt in table.items()}
                       for k, table in enumerate(counts)]

    @classmethod
    def fit(cls, ids: Sequence[int], order: int, vocab_size: int) -> KneserNey:
        ids = list(ids)
        counts: list[dict[tuple, dict[int, int]]] = [defaultdict(dict) for _ in range(order)]
        top = counts[order - 1]
        for i in range(len(ids)):
            if i >= order - 1:
                ctx, w = tuple(ids[i - order + 1:i]), ids[i]
                top[ctx][w] = top[ctx].get(w, 0) + 1
        # continuation counts: each distinct (k+2)-gram adds one to its last k+1 characters
        for k in range(order - 1):
            grams = {tuple(ids[i - k - 1:i + 1]) for i in range(k + 1, len(ids))}
            table = counts[k]
            for gram in grams:
                ctx, w = gram[1:-1], gram[-1]
                table[ctx][w] = table[ctx].get(w, 0) + 1
        return cls(order, vocab_size, [dict(t) for t in counts])

    def prob(self, history: Sequence[int], w: int) -> float:
        """p(w | the last order-1 ids of history)."""
        p = 1.0 / self.vocab_size
        for k in range(min(self.order, len(history) + 1)):
            entry = self.tables[k].get(tuple(history[len(history) - k:]) if k else ())
            if entry is None:
                break  # a longer context is unseen too
            p = entry.adjusted.get(w, 0.0) + entry.gamma * p
        return p

    def distribution(self, history: Sequence[int]) -> np.ndarray:
        """p(. | history) over the whole vocabulary, float64, summing to 1."""
        p = np.full(self.vocab_size, 1.0 / self.vocab_size)
        for k in range(min(self.order, len(history) + 1)):
            entry = self.tables[k].get(tuple(history[len(history) - k:]) if k else ())
            if entry is None:
                break
            p *= entry.gamma
            p[entry.ids] += entry.values
        return p

    def distributions(self, contexts: torch.Tensor) -> torch.Tensor:
        """`distribution` of every row of contexts (rows, width) int, -1 where the text had not begun:
        (rows, V) float32, in one C call on a CPU (kernels.ngram_distributions), else row by row."""
        if (native := kernels.ngram_distributions(contexts, self.order, self.vocab_size, self.flat)) is not None:
            return native
        rows = [[i for i in row if i >= 0] for row in contexts.tolist()]
        return torch.from_numpy(np.stack([self.distribution(r) for r in rows]).astype(np.float32)).to(contexts.device)

    @functools.cached_property
    def flat(self) -> dict[str, np.ndarray]:
        """The tables as flat arrays for the C walk (kernels.c's ngram_distributions): per order, its
        sorted contexts; per context, its gamma and its range of (next id, discounted probability)."""
        ctx_ids: list[np.ndarray] = []
        gammas: list[float] = []
        ctx_start, ctx_count, ctx_first, entry, nexts, values = [], [], [], [0], [], []
        for table in self.tables:
            contexts = sorted(table)
            ctx_start.append(sum(len(c) for c in ctx_ids))
            ctx_count.append(len(contexts))
            ctx_first.append(len(gammas))
            for ctx in contexts:
                context = table[ctx]
                ctx_ids.append(np.asarray(ctx, dtype=np.int32))
                nexts.append(context.ids.astype(np.int32))
                values.append(context.values)
                gammas.append(context.gamma)
                entry.append(entry[-1] + len(context.ids))
        return {"ctx_ids": np.concatenate(ctx_ids) if ctx_ids else np.zeros(0, np.int32),
                "ctx_start": np.asarray(ctx_start, np.int64), "ctx_count": np.asarray(ctx_count, np.int64),
                "ctx_first": np.asarray(ctx_first, np.int64), "entry": np.asarray(entry, np.int64),
                "next": np.concatenate(nexts) if nexts else np.zeros(0, np.int32),
                "value": np.concatenate(values) if values else np.zeros(0, np.float64),
                "gamma": np.asarray(gammas, np.float64)}

    def matched_order(self, history: Sequence[int]) -> int:
        """The longest order whose context has been seen (1 = unigram only)."""
        k = 0
        while k + 1 < min(self.order, len(history) + 1) and tuple(history[len(history) - k - 1:]) in self.tables[k + 1]:
            k += 1
        return k + 1

    def log_probs(self, ids: Sequence[int], start: int = 1) -> list[float]:
        """ln p(ids[i] | ids[:i]) for i from start on."""
        return [math.log(self.prob(ids[max(0, i - self.order + 1):i], ids[i])) for i in range(start, len(ids))]

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat integer tables for a safetensors file: per order, the contexts' ids, and for
        each context an offset into the (next id, count) pairs."""
        out = {"ngram.meta": torch.tensor([self.order, self.vocab_size], dtype=torch.int64)}
        for k, table in enumerate(self.counts):
            contexts = sorted(table)
            offsets, nexts, values = [0], [], []
            for ctx in contexts:
                for w, c in sorted(table[ctx].items()):
                    nexts.append(w)
                    values.append(c)
                offsets.append(len(nexts))
            out[f"ngram.{k}.contexts"] = torch.tensor(contexts, dtype=torch.int32).reshape(len(contexts), k)
            out[f"ngram.{k}.offsets"] = torch.tensor(offsets, dtype=torch.int64)
            out[f"ngram.{k}.next"] = torch.tensor(nexts, dtype=torch.int32)
            out[f"ngram.{k}.count"] = torch.tensor(values, dtype=torch.int32)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> KneserNey:
        order, vocab_size = (int(x) for x in tensors["ngram.meta"].tolist())
        counts = []
        for k in range(order):
            contexts = tensors[f"ngram.{k}.contexts"].tolist()
            offsets = tensors[f"ngram.{k}.offsets"].tolist()
            nexts, values = tensors[f"ngram.{k}.next"].tolist(), tensors[f"ngram.{k}.count"].tolist()
            if len(offsets) != len(contexts) + 1 or offsets[-1] != len(nexts) or len(nexts) != len(values):
                raise ValueError(f"n-gram order {k + 1} tables are inconsistent")
            if nexts and not (0 <= min(nexts) and max(nexts) < vocab_size) or (values and min(values) < 1):
                raise ValueError(f"n-gram order {k + 1} holds ids outside the vocabulary or counts below 1")
            counts.append({tuple(ctx): dict(zip(nexts[a:b], values[a:b], strict=True))
                           for ctx, a, b in zip(contexts, offsets[:-1], offsets[1:], strict=True)})
        return cls(order, vocab_size, counts)
