"""`lyrics mix`: EM weights, a tuning model that must not have seen the validation text, and a mixture
checkpoint that reports its validation perplexity and serves like any model."""

import pytest
import torch
from safetensors import safe_open

from lyrics_cli import main
from model_store.checkpoint import load_checkpoint, read_metadata
from model_store.mixture import MixtureLM
from model_store.scoring import score_text
from training.corpus import load_corpus
from training.mix import fit_weights

TINY = ["--cell", "gru", "--embed-size", "8", "--hidden-size", "16", "--num-steps", "8", "--batch-size", "4",
        "--epochs", "2", "--lr", "0.02", "--sample-every", "0", "--no-progress"]


def test_em_recovers_the_weights_of_the_mixture_that_generated_the_data():
    torch.manual_seed(0)
    components = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1], [0.1, 0.6, 0.1, 0.1, 0.1], [0.05, 0.05, 0.1, 0.4, 0.4]],
                              dtype=torch.float64)
    true = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=torch.float64)
    n = 40000
    buckets = torch.randint(0, 2, (n,))
    symbols = torch.multinomial(true[buckets] @ components, 1)[:, 0]  # drawn from each bucket's mixture
    probs = components[:, symbols].T  # each component's probability of the drawn symbol
    assert torch.allclose(fit_weights(probs, buckets, 2, iterations=500), true, atol=0.04)


@pytest.fixture(scope="module")
def models(tmp_path_factory, session_corpus_file):
    directory = tmp_path_factory.mktemp("mix")
    train_chars = len(load_corpus(session_corpus_file).train_ids)
    assert main(["train", "--corpus", str(session_corpus_file), "--out", str(directory / "final.safetensors"),
                 *TINY]) == 0
    assert main(["train", "--corpus", str(session_corpus_file), "--out", str(directory / "tune.safetensors"),
                 "--max-chars", str(train_chars), *TINY]) == 0
    return directory


def test_mix_writes_a_mixture_that_reports_its_validation_perplexity(models, session_corpus_file, capsys):
    out = models / "mix.safetensors"
    assert main(["mix", "--corpus", str(session_corpus_file), "--model", str(models / "final.safetensors"),
                 "--tune-model", str(models / "tune.safetensors"), "--out", str(out), "--order", "4",
                 "--cache-order", "3", "--cache-window", "256"]) == 0
    assert "validation perplexity" in capsys.readouterr().out
    ck = load_checkpoint(out)
    assert isinstance(ck.model, MixtureLM) and ck.model.mixture.cache_order == 3 and ck.model.ngram.order == 4
    training = read_metadata(out)["training"]
    corpus = load_corpus(session_corpus_file)
    val_text = corpus.text[len(corpus.train_ids) - 1:]
    assert training["val_perplexity"] == pytest.approx(score_text(ck.model, ck.vocab, val_text).perplexity, rel=1e-5)
    assert training["command"].startswith("lyrics mix --corpus")
    report = training["mixture"]
    assert report["tuning_chars"] == len(load_corpus(session_corpus_file, max_chars=len(corpus.train_ids)).val_ids)
    # EM weights: the mixture is at least about as good as its best component
    assert training["val_perplexity"] <= 1.02 * min(report["val_perplexity_alone"].values())


def test_a_tuning_model_that_saw_the_validation_text_is_refused(models, session_corpus_file, capsys):
    code = main(["mix", "--corpus", str(session_corpus_file), "--model", str(models / "final.safetensors"),
                 "--tune-model", str(models / "final.safetensors"), "--out", str(models / "bad.safetensors")])
    assert code == 2
    assert "overlap the validation text" in capsys.readouterr().err
    assert not (models / "bad.safetensors").exists()


def test_without_the_ngram_the_mixture_is_the_recurrent_model_and_the_cache(models, session_corpus_file, capsys):
    out = models / "rnn-cache.safetensors"
    assert main(["mix", "--corpus", str(session_corpus_file), "--model", str(models / "final.safetensors"),
                 "--tune-model", str(models / "tune.safetensors"), "--out", str(out), "--no-ngram",
                 "--cache-order", "3", "--cache-window", "256"]) == 0
    ck = load_checkpoint(out)
    assert ck.model.ngram is None and all(w[1] == 0 for w in ck.model.mixture.weights)
    assert not any(name.startswith("ngram.") for name in safe_open(out, "pt").keys())
    assert set(read_metadata(out)["training"]["mixture"]["val_perplexity_alone"]) == {"rnn", "cache"}


def test_models_names_a_mixtures_components(models, session_corpus_file, capsys):
    out = models / "listed.safetensors"
    assert main(["mix", "--corpus", str(session_corpus_file), "--model", str(models / "final.safetensors"),
                 "--tune-model", str(models / "tune.safetensors"), "--out", str(out), "--order", "3",
                 "--cache-order", "2", "--cache-window", "64"]) == 0
    capsys.readouterr()
    assert main(["models", "--dir", str(models)]) == 0
    lines = {line.split(":")[0].removesuffix(" (default)"): line for line in capsys.readouterr().out.splitlines()}
    assert "gru 1x16 + ngram + cache," in lines["listed"]
    assert "gru 1x16," in lines["final"]
