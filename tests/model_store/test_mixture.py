"""The mixture model: a normalised, causal distribution that steps exactly as it scores, a cache that
notices repeats, and a checkpoint that keeps all of it."""

import pytest
import torch

from model_store import kernels, scoring
from model_store.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model_store.generate import generate
from model_store.mixture import HistoryCache, MixtureConfig, MixtureLM
from model_store.ngram import KneserNey
from model_store.sampling import SamplingParams, decoding
from model_store.scoring import score_text
from model_store.vocab import Vocabulary

VOCAB = Vocabulary("abcdefgh \n")
TRAIN = "abc def\nabc deg\nhab cde\n" * 3
TEXT = "abc dee\nfgh abc\nabc dee\nfgh a"


def weights(order, cache_share=0.5):
    return tuple((round((1 - cache_share * k / order) / 2, 6), round((1 - cache_share * k / order) / 2, 6),
                  round(cache_share * k / order, 6)) for k in range(order + 1))


@pytest.fixture
def mixture(make_model):
    rnn = make_model("lstm", vocab_size=len(VOCAB), hidden_size=8, embed_size=4, std=0.5, seed=3)
    ngram = KneserNey.fit(VOCAB.encode(TRAIN), 3, len(VOCAB))
    return MixtureLM(rnn, ngram, MixtureConfig(weights=weights(4), cache_order=4, cache_window=16)).eval()


def log_probs(model, text):
    with torch.no_grad():
        out, _ = model(torch.tensor([VOCAB.encode(text)]))
    return out[0]


def test_every_step_is_a_distribution(mixture):
    out = log_probs(mixture, TEXT)
    assert torch.allclose(out.exp().sum(-1), torch.ones(len(TEXT)), atol=1e-5)


def test_later_characters_never_change_earlier_predictions(mixture):
    a, b = log_probs(mixture, TEXT), log_probs(mixture, TEXT[:-5] + "hhhhh")
    assert torch.equal(a[:-5], b[:-5])
    assert not torch.equal(a[-4:], b[-4:])


def test_stepping_one_character_at_a_time_equals_one_call(mixture):
    """Generation steps with the carried state; scoring runs whole windows: they must agree,
    including once the text is longer than the cache window (16)."""
    whole = log_probs(mixture, TEXT)
    ids, state, steps = VOCAB.encode(TEXT), None, []
    with torch.no_grad():
        for i in ids:
            out, state = mixture(torch.tensor([[i]]), state)
            steps.append(out[0, 0])
    assert torch.allclose(torch.stack(steps), whole, atol=1e-5)


def test_windowed_scoring_equals_one_pass(mixture, monkeypatch):
    whole = score_text(mixture, VOCAB, TEXT)
    monkeypatch.setattr(scoring, "WINDOW", 5)
    assert score_text(mixture, VOCAB, TEXT).cross_entropy == pytest.approx(whole.cross_entropy, rel=1e-5)


def test_the_cache_predicts_a_repeat_from_the_longest_matching_context():
    cache = HistoryCache(order=4, vocab_size=len(VOCAB))
    history = torch.tensor([[-1, -1] + VOCAB.encode("fgh abc dfgh ab")])
    p, bucket = cache(history)
    assert bucket.item() == 4  # "h ab" occurred before, followed by "c"
    assert p[0, VOCAB.encode("c")[0]] > 0.5
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    empty, none = cache(torch.full((1, 8), -1))
    assert none.item() == 0 and torch.allclose(empty, torch.full_like(empty, 1 / len(VOCAB)))


def test_the_mixture_beats_its_recurrent_model_on_repetitive_text(mixture):
    repeated = "fa chd\n" * 8  # repeats within the 16-character cache window
    assert score_text(mixture, VOCAB, repeated).perplexity < 0.5 * score_text(mixture.rnn, VOCAB, repeated).perplexity


def test_generation_runs_on_the_recurrent_model_alone_while_scoring_uses_the_mixture(mixture):
    """A cache of the text being written feeds on the model's own output: generation leaves it (and the
    n-gram) out, greedy and sampled, while scoring keeps the whole mixture."""
    text = generate(mixture, VOCAB, "abc d", 30)[0].text
    assert text.startswith("abc d") and len(text) == 35
    assert text == generate(mixture.rnn, VOCAB, "abc d", 30)[0].text
    greedy = [VOCAB.encode(text[i])[0] for i in range(5, 35)]
    assert greedy == [log_probs(mixture.rnn, text[:i])[-1].argmax().item() for i in range(5, 35)]
    assert greedy != [log_probs(mixture, text[:i])[-1].argmax().item() for i in range(5, 35)]  # not the mixture's
    for params in (SamplingParams(temperature=1.0), decoding(best_of=3)):
        assert generate(mixture, VOCAB, "abc d", 30, params, seed=4) == generate(mixture.rnn, VOCAB, "abc d", 30,
                                                                                 params, seed=4)
    assert score_text(mixture, VOCAB, text).perplexity != pytest.approx(score_text(mixture.rnn, VOCAB, text).perplexity)


def test_checkpoint_round_trip_keeps_weights_ngram_and_cache_settings(mixture, tmp_path):
    path = tmp_path / "mix.safetensors"
    save_checkpoint(path, mixture, VOCAB, "keep", {"val_perplexity": 3.0})
    ck = load_checkpoint(path)
    assert isinstance(ck.model, MixtureLM)
    assert ck.model.mixture == mixture.mixture
    assert torch.allclose(log_probs(ck.model, TEXT), log_probs(mixture, TEXT), atol=1e-6)


@pytest.mark.parametrize("damage", ["weights", "tables", "orphan tables"])
def test_a_damaged_mixture_file_is_refused_with_the_reason(mixture, tmp_path, damage):
    import json

    from safetensors.torch import load_file, save_file
    path = tmp_path / "mix.safetensors"
    save_checkpoint(path, mixture, VOCAB, "keep", {})
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["lyrics"])
    tensors = load_file(path)
    if damage == "weights":
        meta["mixture"]["weights"][0] = [0.9, 0.9, 0.9]
    elif damage == "tables":
        tensors["ngram.1.count"] = torch.zeros_like(tensors["ngram.1.count"])
    else:
        del meta["mixture"]
    save_file(tensors, path, metadata={"lyrics": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="mixture|n-gram"):
        load_checkpoint(path)


def test_weights_must_be_one_triple_per_bucket_summing_to_one():
    with pytest.raises(ValueError, match="weight triples"):
        MixtureConfig(weights=weights(2), cache_order=3)
    with pytest.raises(ValueError, match="summing to 1"):
        MixtureConfig(weights=((0.5, 0.5, 0.5), (1.0, 0.0, 0.0)), cache_order=1)


def test_a_mixture_without_an_ngram_must_not_weigh_one(mixture, tmp_path):
    with pytest.raises(ValueError, match="weight 0"):
        MixtureLM(mixture.rnn, None, mixture.mixture)
    no_ngram = MixtureLM(mixture.rnn, None, MixtureConfig(weights=((0.6, 0.0, 0.4),) * 5, cache_order=4,
                                                          cache_window=16)).eval()
    out = log_probs(no_ngram, TEXT)
    assert torch.allclose(out.exp().sum(-1), torch.ones(len(TEXT)), atol=1e-5)
    save_checkpoint(tmp_path / "m.safetensors", no_ngram, VOCAB, "keep", {})
    assert torch.allclose(log_probs(load_checkpoint(tmp_path / "m.safetensors").model, TEXT), out, atol=1e-6)


def test_last_only_gives_the_last_steps_prediction_and_the_same_state(mixture):
    inputs = torch.tensor([VOCAB.encode(TEXT)])
    with torch.no_grad():
        whole, whole_state = mixture(inputs)
        last, last_state = mixture(inputs, last_only=True)
    assert last.shape == (1, 1, len(VOCAB))
    assert torch.equal(last[:, 0], whole[:, -1])
    assert all(torch.equal(a, b) for a, b in zip(last_state, whole_state, strict=True))


def test_step_equals_a_one_position_forward(mixture):
    state = mixture.init_state(2)
    ids = torch.tensor(VOCAB.encode(TEXT[:2]))
    with torch.no_grad():
        log_probs, new_state = mixture.step(ids, state)
        ref, ref_state = mixture(ids[:, None], state)
    assert torch.equal(log_probs, ref[:, -1])
    assert all(torch.equal(a, b) for a, b in zip(new_state, ref_state, strict=True))


@pytest.mark.parametrize("order", [1, 4, 6])
def test_the_c_cache_equals_the_torch_cache(order, monkeypatch):
    if kernels.library() is None:
        pytest.skip("the C kernels could not be built here (no C compiler?)")
    g = torch.Generator().manual_seed(order)
    vocab, window = 7, 40
    history = torch.randint(0, 3, (12, window), generator=g, dtype=torch.int32)  # small alphabet: long matches
    history[:, -5:] = history[:, 10:15]  # the window's end occurred before
    history[0] = -1  # empty
    history[1, :30] = -1  # partly filled
    history[2, :] = torch.randint(3, vocab, (window,), generator=g, dtype=torch.int32)
    cache = HistoryCache(order, vocab)
    native = cache(history), cache.steps(history, 30)  # one window per row; windows of 30 at 11 offsets
    monkeypatch.setattr(kernels, "ENABLED", False)
    reference = cache(history), cache.steps(history, 30)
    for (p, bucket), (p_ref, bucket_ref) in zip(native, reference, strict=True):
        assert torch.equal(bucket, bucket_ref)
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)
    assert {0, order} <= set(native[0][1].tolist())  # no match and the longest one both occur
    assert native[1][0].shape == (12, 11, vocab)


def test_the_c_cache_refuses_a_character_outside_the_vocabulary():
    if kernels.library() is None:
        pytest.skip("the C kernels could not be built here (no C compiler?)")
    with pytest.raises(IndexError, match="row 1 .* outside the vocabulary"):
        HistoryCache(2, 5)(torch.tensor([[0, 1, 2, 3], [0, 1, 5, 3]], dtype=torch.int32))


@pytest.mark.parametrize("with_ngram", [True, False])
def test_the_mixture_in_c_equals_the_mixture_as_torch_ops(mixture, with_ngram, monkeypatch):
    if kernels.library() is None:
        pytest.skip("the C kernels could not be built here (no C compiler?)")
    if not with_ngram:
        config = MixtureConfig(weights=tuple((w[0] + w[1], 0.0, w[2]) for w in weights(4)), cache_order=4,
                               cache_window=16)
        mixture = MixtureLM(mixture.rnn, None, config).eval()
    native = log_probs(mixture, TEXT)
    monkeypatch.setattr(kernels, "ENABLED", False)
    torch.testing.assert_close(native, log_probs(mixture, TEXT), rtol=1e-5, atol=1e-5)


def test_packing_a_mixture_prepares_its_ngram_tables(mixture):
    assert "flat" not in vars(mixture.ngram)
    mixture.pack()
    assert "flat" in vars(mixture.ngram)
