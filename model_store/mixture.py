"""A mixture model: a recurrent model, a Kneser-Ney n-gram and a cache of the text itself.

    p(w | text so far) = l_rnn(b) p_rnn(w) + l_ngram(b) p_ngram(w) + l_cache(b) p_cache(w)

* p_rnn: the recurrent model's softmax.
* p_ngram: the Kneser-Ney n-gram of the training text (ngram.py); optional: without it
  (weight 0) the mixture is the recurrent model with a cache and nothing else.
* p_cache: an n-gram of the text being scored or continued, up to `cache_order`
  characters of context over the last `cache_window` characters, interpolated
  Witten-Bell style from the longest matching context down to the text's unigram.
  Lyrics repeat themselves (a chorus comes back two or three times), and a cache is what
  notices that the last few characters were followed by something earlier in the song.
* b, the bucket: how long a context the cache matched (0..cache_order). Each bucket has
  its own three weights, fitted by EM on held-out training text (training/mix.py), so the
  cache gets a large weight only where it has matched a long context.

`MixtureLM` looks like a `CharLM` to everything that uses one (scoring, generation, the
batching engine): `forward(inputs, state)` returns log-probabilities as logits and a state
whose tensors all have the batch on dim 1: the recurrent state, then the history window
(1, batch, window) of int32 character ids, -1 where empty. Sampling with a temperature T from
log-probabilities draws from p^(1/T), as it does from a plain model's logits.

Generation does not mix the cache in (`for_generation`): a cache of the text being written feeds
on the model's own output, and a loop, once started, is what it predicts best. Scoring keeps it.
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model_store import kernels
from model_store.model import CharLM
from model_store.ngram import KneserNey

COMPONENTS = ("rnn", "ngram", "cache")


@dataclass(frozen=True)
class MixtureConfig:
    weights: tuple[tuple[float, ...], ...]  # per bucket 0..cache_order: (rnn, ngram, cache)
    cache_order: int = 6
    cache_window: int = 2048

    def __post_init__(self):
        if self.cache_order < 1 or self.cache_window <= self.cache_order:
            raise ValueError("cache_order must be at least 1 and cache_window longer than cache_order")
        if len(self.weights) != self.cache_order + 1:
            raise ValueError(f"need {self.cache_order + 1} weight triples (one per bucket), not {len(self.weights)}")
        for w in self.weights:
            if len(w) != 3 or min(w) < 0 or abs(sum(w) - 1) > 1e-4:
                raise ValueError(f"each bucket's weights must be 3 non-negative numbers summing to 1, not {w}")

    def to_dict(self) -> dict:
        return asdict(self)


class HistoryCache:
    """The cache component over a batch of history windows (batch, window), newest last."""

    def __init__(self, order: int, vocab_size: int):
        self.order, self.vocab_size = order, vocab_size

    def __call__(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_cache (batch, vocab), bucket (batch,)) for the character after each window."""
        p, bucket = self.steps(history, history.shape[1])
        return p[:, 0], bucket[:, 0]

    def steps(self, text: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_cache (batch, steps, vocab), bucket (batch, steps)) after every window text[:, t:t + window]:
        in one C call on a CPU (kernels.history_cache), else window by window as torch ops."""
        if native := kernels.history_cache(text, window, self.order, self.vocab_size):
            return native
        each = [self.one_window(text[:, t:t + window]) for t in range(text.shape[1] - window + 1)]
        return torch.stack([p for p, _ in each], dim=1), torch.stack([b for _, b in each], dim=1)

    def one_window(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, window, order = *history.shape, self.order
        follower = history[:, 1:]  # position j of the window was followed by follower[j]
        # windows[:, o, j]: the character (order - o) places before position j (-2 off the left edge)
        windows = F.pad(history[:, :-1], (order, 0), value=-2).unfold(1, window - 1, 1)
        match = follower >= 0  # position j has a follower
        matches = [match]
        for i in range(order):  # extend every match by one more character of context
            current = history[:, window - 1 - i, None]  # the character i places before the next
            match = match & (windows[:, order - i] == current) & (current >= 0)
            matches.append(match)
        # matches[k][:, j]: position j ends the same k characters as the window does, and has a follower
        weights = torch.stack(matches, dim=1).float()
        counts = torch.zeros(batch, order + 1, self.vocab_size, device=history.device).scatter_add_(
            2, follower.clamp(min=0).long()[:, None].expand(-1, order + 1, -1), weights)
        totals = weights.sum(2)
        types = torch.count_nonzero(counts, dim=2).float()
        seen = totals > 0  # (batch, order + 1): the context of length k occurred before
        # Witten-Bell from the text's unigram (k = 0) up: p_k = (counts_k + types_k p_(k-1)) / (totals_k + types_k),
        # p_k = p_(k-1) where context k was never seen, p_(-1) uniform. Unrolled: p = sum_k coef_k counts_k + rest / V
        own = torch.where(seen, 1 / (totals + types).clamp(min=1), 0.0)
        carry = torch.where(seen, types * own, 1.0)
        later = torch.cat([carry.flip(1).cumprod(1).flip(1)[:, 1:], torch.ones(batch, 1, device=history.device)], 1)
        p = torch.bmm((own * later)[:, None], counts)[:, 0] + (carry.prod(1, keepdim=True) / self.vocab_size)
        bucket = seen[:, 1:].sum(1)  # contexts are nested: the number seen is the longest matched length
        return p, bucket


class MixtureLM(nn.Module):
    weights: torch.Tensor  # (buckets, 3), a buffer

    def __init__(self, rnn: CharLM, ngram: KneserNey | None, config: MixtureConfig):
        super().__init__()
        if ngram is None and any(w[1] for w in config.weights):
            raise ValueError("a mixture without an n-gram must give it weight 0 in every bucket")
        if ngram is not None and ngram.vocab_size != rnn.config.vocab_size:
            raise ValueError(f"n-gram vocabulary {ngram.vocab_size} != model vocabulary {rnn.config.vocab_size}")
        self.rnn, self.ngram, self.mixture = rnn, ngram, config
        self.cache = HistoryCache(config.cache_order, rnn.config.vocab_size)
        self.register_buffer("weights", torch.tensor(config.weights, dtype=torch.float32), persistent=False)
        self.rnn_only = ngram is None and all(w[0] == 1.0 for w in config.weights)  # nothing to mix in

    # what generation, scoring and the registry ask of a model
    @property
    def config(self):
        return self.rnn.config

    @property
    def dense(self) -> nn.Linear:
        return self.rnn.dense

    @property
    def impl(self) -> str:
        return self.rnn.impl

    def num_parameters(self) -> int:
        return self.rnn.num_parameters()

    def pack(self) -> bool:
        """Ready for serving: the recurrent model's packed weights, and the n-gram's flat tables (0.2 s
        for a 7-gram of the shared corpus, which the first request would otherwise wait for)."""
        if self.ngram is not None:
            self.ngram.flat  # noqa: B018 (a cached property: computed now, once)
        return self.rnn.pack()

    @property
    def is_packed(self) -> bool:
        return self.rnn.is_packed

    def init_state(self, batch_size: int, device=None) -> tuple[torch.Tensor, ...]:
        device = device or self.dense.weight.device
        rnn_state = self.rnn.init_state(batch_size, device)
        # int32: half the memory and state-handle size of int64, and room for any vocabulary
        history = torch.full((1, batch_size, self.mixture.cache_window), -1, dtype=torch.int32, device=device)
        return (*self.split(rnn_state), history)

    def parts(self, state) -> tuple:
        """(the recurrent model's state, the history window) of a mixture state."""
        *rnn_state, history = state
        return (tuple(rnn_state) if self.config.cell == "lstm" else rnn_state[0]), history

    @staticmethod
    def split(state) -> tuple[torch.Tensor, ...]:
        return state if isinstance(state, tuple) else (state,)

    def step(self, ids: torch.Tensor, state) -> tuple[torch.Tensor, tuple]:
        """One generation step, as CharLM.step: ids (batch,) -> log-probabilities (batch, vocab), state."""
        if self.rnn_only:  # the recurrent model's own (packed) step; the history moves on by one character
            rnn_state, history = self.parts(state)
            logits, rnn_state = self.rnn.step(ids, rnn_state)
            history = torch.cat([history[:, :, 1:], ids.to(history.dtype)[None, :, None]], dim=2)
            return torch.log_softmax(logits.float(), dim=-1), (*self.split(rnn_state), history)
        log_probs, state = self(ids[:, None], state)
        return log_probs[:, -1], state

    def forward(self, inputs: torch.Tensor, state=None, last_only: bool = False) -> tuple[torch.Tensor, tuple]:
        if self.rnn_only:  # the history is still kept, so states (and state handles) keep one layout
            state = self.init_state(inputs.shape[0], inputs.device) if state is None else state
            rnn_state, history = self.parts(state)
            logits, rnn_state = self.rnn(inputs, rnn_state)
            text = torch.cat([history[0], inputs.to(history.dtype)], dim=1)[:, -history.shape[2]:]
            logits = logits[:, -1:] if last_only else logits
            return torch.log_softmax(logits.float(), dim=-1), (*self.split(rnn_state), text[None].contiguous())
        parts, state = self.components(inputs, state, last_only)
        weights = self.weights[parts.pop("bucket")]  # (batch, steps, 3)
        logits = parts.pop("logits").float()
        log_probs = kernels.mix_log_probs(logits, weights, parts.get("ngram"), parts["cache"])  # in C on a CPU
        if log_probs is None:
            probs = {"rnn": F.softmax(logits, dim=-1), **parts}
            mixed = torch.zeros_like(logits)
            for i, name in enumerate(COMPONENTS):
                if name in probs:
                    mixed = mixed + weights[..., i, None] * probs[name]
            log_probs = mixed.clamp(min=1e-30).log()
        return log_probs, state

    def component_probs(self, inputs: torch.Tensor, state=None) -> tuple[dict[str, torch.Tensor], tuple]:
        """Each component's next-character distribution at every step ("ngram" only when there is
        one), and the cache bucket."""
        parts, state = self.components(inputs, state)
        parts["rnn"] = F.softmax(parts.pop("logits").float(), dim=-1)
        return parts, state

    def components(self, inputs: torch.Tensor, state=None,
                   last_only: bool = False) -> tuple[dict[str, torch.Tensor], tuple]:
        """The recurrent model's logits, the cache's and the n-gram's ("ngram" only when there is
        one) distributions at every step (`last_only`: at the last), and the cache bucket."""
        if state is None:
            state = self.init_state(inputs.shape[0], inputs.device)
        rnn_state, history = self.parts(state)
        logits, rnn_state = self.rnn(inputs, rnn_state)  # all steps: exactly what scoring the text gives
        window = history.shape[2]
        text = torch.cat([history[0, :, 1:], inputs.to(history.dtype)], dim=1)  # step t reads text[:, t:t + window]
        state = (*self.split(rnn_state), text[None, :, -window:].contiguous())
        if last_only:
            logits, text = logits[:, -1:], text[:, -window:]
        batch, steps = text.shape[0], text.shape[1] - window + 1
        cache, buckets = self.cache.steps(text, window)
        parts = {"logits": logits, "cache": cache, "bucket": buckets}
        if self.ngram is not None:  # step t's context: the last order - 1 ids of its window
            context = self.ngram.order - 1
            contexts = (text[:, window - context:].unfold(1, context, 1).reshape(batch * steps, context) if context
                        else text.new_empty(batch * steps, 0))
            parts["ngram"] = self.ngram.distributions(contexts).view(batch, steps, -1)
        return parts, state


_generation_views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def for_generation(model):
    """What generation runs for `model`: a plain model itself; for a mixture, one view (made once) of
    its recurrent model alone, whose states keep the mixture's layout, so state handles work either way."""
    if not isinstance(model, MixtureLM) or model.rnn_only:
        return model
    view = _generation_views.get(model)
    if view is None:
        order, window = model.mixture.cache_order, model.mixture.cache_window
        static = MixtureConfig(((1.0, 0.0, 0.0),) * (order + 1), order, window)
        view = _generation_views[model] = MixtureLM(model.rnn, None, static).eval()
    return view


LanguageModel = CharLM | MixtureLM  # what a checkpoint holds, and what generation and scoring take
