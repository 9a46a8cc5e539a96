"""`lyrics mix`: build a mixture model (model_store/mixture.py) from a trained recurrent model.

The mixture's weights must be fitted on text none of its components has seen, and never on
the validation text. So the weights are fitted with a *tuning* model: the same recipe
trained on the training part alone (`lyrics train ... --max-chars <training characters>`),
whose own held-out tail is then text inside the final model's training part. On that tail,
with an n-gram fitted on the tuning model's training text, EM finds each cache bucket's
weights. The final mixture pairs those weights with the final recurrent model and an
n-gram of the final model's whole training part, and reports its validation perplexity.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from model_store.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from model_store.mixture import COMPONENTS, MixtureConfig, MixtureLM
from model_store.model import CharLM
from model_store.ngram import KneserNey
from model_store.scoring import score_ids
from training.corpus import Corpus, CorpusError, load_corpus


@dataclass
class MixConfig:
    corpus: str
    model: str
    tune_model: str
    out: str
    order: int = 7
    cache_order: int = 6
    cache_window: int = 2048
    ngram: bool = True  # False: the recurrent model and the cache alone
    command: str = ""


def corpus_of(ck: Checkpoint, path: str) -> Corpus:
    """The corpus, split exactly as this checkpoint's training run split it."""
    options = ck.training.get("options") or {}
    corpus = load_corpus(path, ck.newlines, options.get("val_frac", 0.1), options.get("max_chars"))
    if ck.training.get("corpus_sha256") not in (None, corpus.sha256):
        raise CorpusError(f"{ck.path} was trained on another corpus than {path} (sha256 differs)")
    return corpus


def fit_weights(probs: torch.Tensor, buckets: torch.Tensor, n_buckets: int, iterations: int = 200) -> torch.Tensor:
    """EM for the weights of a mixture with fixed components, separately per bucket.
    probs: (positions, components), each component's probability of the true character."""
    weights = torch.full((n_buckets, probs.shape[1]), 1.0 / probs.shape[1], dtype=torch.float64)
    probs = probs.double()
    for _ in range(iterations):
        joint = weights[buckets] * probs
        responsibility = joint / joint.sum(1, keepdim=True)
        for b in range(n_buckets):
            mine = buckets == b
            if mine.any():
                weights[b] = responsibility[mine].mean(0)
    return weights


@torch.no_grad()
def target_probs(model: MixtureLM, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each component's probability of ids[i + 1] after ids[:i + 1], and the cache bucket there."""
    probs, _ = model.component_probs(torch.tensor([ids[:-1]]))
    targets = torch.tensor(ids[1:])[:, None]
    # an absent n-gram is probability 0, so EM gives it weight 0
    table = torch.stack([probs[name][0].gather(1, targets)[:, 0] if name in probs else torch.zeros(len(targets))
                         for name in COMPONENTS], dim=1)
    return table, probs["bucket"][0]


def recurrent(ck: Checkpoint) -> CharLM:
    """The checkpoint's recurrent model; a mixture is refused."""
    if isinstance(ck.model, MixtureLM):
        raise ValueError(f"{ck.path} is already a mixture: give the recurrent model it was built from")
    return ck.model


def mix(cfg: MixConfig, log=None) -> dict:
    log = log or (lambda msg: print(msg, file=sys.stderr))
    final, tuner = load_checkpoint(cfg.model), load_checkpoint(cfg.tune_model)
    final_model, tuner_model = recurrent(final), recurrent(tuner)
    if final.newlines != tuner.newlines or final.config.cell != tuner.config.cell:
        log(f"note: tuning model {tuner.path} differs from {final.path} in cell or newline policy")
    corpus, tune_corpus = corpus_of(final, cfg.corpus), corpus_of(tuner, cfg.corpus)
    if not tune_corpus.val_ids:
        raise CorpusError(f"{tuner.path} was trained without a validation split: nothing to tune on")
    if len(tune_corpus.text) > len(corpus.train_ids):
        raise CorpusError(f"{tuner.path} saw {len(tune_corpus.text)} characters, more than the "
                          f"{len(corpus.train_ids)} of {final.path}'s training part: its held-out tail would "
                          f"overlap the validation text. Train it with --max-chars {len(corpus.train_ids)}")

    n_buckets = cfg.cache_order + 1
    start = (1 / 3, 1 / 3, 1 / 3) if cfg.ngram else (0.5, 0.0, 0.5)
    uniform = MixtureConfig(weights=(start,) * n_buckets, cache_order=cfg.cache_order, cache_window=cfg.cache_window)
    components = [name for name in COMPONENTS if cfg.ngram or name != "ngram"]

    def ngram_of(ids, vocab_size):
        return KneserNey.fit(ids, cfg.order, vocab_size) if cfg.ngram else None

    log(f"fitting the mixture weights on the last {len(tune_corpus.val_ids):,} characters of the training part")
    tune_mixture = MixtureLM(tuner_model, ngram_of(tune_corpus.train_ids, len(tune_corpus.vocab)), uniform).eval()
    probs, buckets = target_probs(tune_mixture, tune_corpus.train_ids[-1:] + tune_corpus.val_ids)
    weights = fit_weights(probs, buckets, n_buckets)  # an absent n-gram (probability 0) gets weight 0
    tuned = (weights[buckets] * probs.double()).sum(1).log().mean().neg().exp().item()
    log(f"tuning-text perplexity: mixture {tuned:.1f}; " + ", ".join(
        f"{name} alone {math.exp(-probs[:, i].double().log().mean().item()):.1f}" for i, name in enumerate(COMPONENTS)
        if name in components))

    config = MixtureConfig(weights=tuple(tuple(round(float(x), 6) for x in row / row.sum()) for row in weights),
                           cache_order=cfg.cache_order, cache_window=cfg.cache_window)
    model = MixtureLM(final_model, ngram_of(corpus.train_ids, len(corpus.vocab)), config).eval()
    summary = dict(final.training)
    report = {"command": cfg.command, "recurrent_model": str(final.path), "tuning_model": str(tuner.path),
              "tuning_chars": len(tune_corpus.val_ids), "tuning_perplexity": tuned,
              "ngram_order": cfg.order if cfg.ngram else None,
              "recurrent_training_command": final.training.get("command"),
              "tuning_training_command": tuner.training.get("command")}
    if corpus.val_ids:
        val_ids = corpus.train_ids[-1:] + corpus.val_ids
        val_probs, val_buckets = target_probs(model, val_ids)
        alone = {name: math.exp(-val_probs[:, i].double().log().mean().item()) for i, name in enumerate(COMPONENTS)
                 if name in components}
        summary["val_perplexity"] = score_ids(model, val_ids).perplexity
        report["val_perplexity_alone"] = alone
        log(f"validation perplexity: mixture {summary['val_perplexity']:.1f}; " +
            ", ".join(f"{k} alone {v:.1f}" for k, v in alone.items()))
    summary["command"] = cfg.command
    summary["mixture"] = report
    save_checkpoint(cfg.out, model, corpus.vocab, final.newlines, summary)
    return summary
