"""State handles: continuing from a snapshot equals generating from the whole text, and a sealed
handle opens only unaltered, unexpired and on the model that made it."""

from __future__ import annotations

import base64

import pytest
import torch

from model_store.generate import generate
from model_store.mixture import MixtureConfig, MixtureLM
from model_store.ngram import KneserNey
from model_store.sampling import SamplingParams
from model_store.state import StateCodec, StateError, model_identity
from model_store.vocab import Vocabulary

VOCAB = Vocabulary("abcdefghij\n ")
CODEC = StateCodec(b"k" * 32, ttl_s=60)


@pytest.mark.parametrize("cell,layers,embed", [("rnn", 1, 0), ("gru", 2, 8), ("lstm", 2, 8), ("lstm", 1, 0)])
@pytest.mark.parametrize("params,seed", [(SamplingParams(), None), (SamplingParams(temperature=0.9, top_k=6), 11),
                                         (SamplingParams(temperature=1.2, top_p=0.8, repetition_penalty=1.5), 3)])
@pytest.mark.parametrize("more", ["", "b", "ghi\nab"])
def test_continuing_from_a_snapshot_equals_generating_from_the_whole_text(make_model, cell, layers, embed, params,
                                                                          seed, more):
    model = make_model(cell=cell, num_layers=layers, embed_size=embed, vocab_size=len(VOCAB))
    [first] = generate(model, VOCAB, "abc", 15, params, seed=seed, keep_state=True)
    [then] = generate(model, VOCAB, more, 20, params, seed=seed, start=first.state)
    [whole] = generate(model, VOCAB, first.text + more, 20, params, seed=seed)
    assert then.generated == whole.generated
    assert then.text == more + whole.generated


def test_each_choice_has_its_own_state(make_model):
    model = make_model(cell="gru", embed_size=8, vocab_size=len(VOCAB))
    params = SamplingParams(temperature=1.0)
    choices = generate(model, VOCAB, "ab", 12, params, seed=5, n=3, keep_state=True)
    assert len({c.text for c in choices}) > 1
    for c in choices:
        [then] = generate(model, VOCAB, "c", 10, params, seed=9, start=c.state)
        assert then.generated == generate(model, VOCAB, c.text + "c", 10, params, seed=9)[0].generated


def test_a_stop_string_stays_in_the_state(make_model):
    """The text drops the stop string; the state has read it, so continuing follows text + stop."""
    model = make_model(cell="lstm", embed_size=8, vocab_size=len(VOCAB))
    [first] = generate(model, VOCAB, "ab", 200, SamplingParams(temperature=1.0), stop=["\n"], seed=1, keep_state=True)
    assert first.finish_reason == "stop"
    [then] = generate(model, VOCAB, "", 20, start=first.state)
    assert then.generated == generate(model, VOCAB, first.text + "\n", 20)[0].generated


def test_a_state_from_zero_new_characters_is_the_prefix_read(make_model):
    model = make_model(cell="gru", num_layers=2, embed_size=8, vocab_size=len(VOCAB))
    [primed] = generate(model, VOCAB, "abcab", 0, keep_state=True)
    assert primed.generated == "" and primed.state is not None
    [then] = generate(model, VOCAB, "", 25, start=primed.state)
    assert then.generated == generate(model, VOCAB, "abcab", 25)[0].generated
    [single] = generate(model, VOCAB, "a", 0, keep_state=True)  # one character: nothing read before it
    [again] = generate(model, VOCAB, "", 0, start=single.state, keep_state=True)
    assert again.state.last == single.state.last and torch.equal(again.state.state, single.state.state)


def test_continuations_chain(make_model):
    model = make_model(cell="rnn", vocab_size=len(VOCAB))
    [a] = generate(model, VOCAB, "a", 8, keep_state=True)
    [b] = generate(model, VOCAB, "ij", 8, start=a.state, keep_state=True)
    [c] = generate(model, VOCAB, "", 8, start=b.state)
    assert c.generated == generate(model, VOCAB, a.text + b.text, 8)[0].generated


def test_a_handle_round_trips_exactly(make_model):
    model = make_model(cell="lstm", num_layers=2, embed_size=8, vocab_size=len(VOCAB))
    [first] = generate(model, VOCAB, "abc", 7, keep_state=True)
    identity = model_identity("m", model, VOCAB)
    handle = CODEC.encode(first.state, identity)
    assert handle.startswith("ls1.") and handle.isascii()
    restored = CODEC.open(handle).snapshot("m", model, VOCAB)
    for got, want in zip(restored.state, first.state.state, strict=True):
        assert torch.equal(got, want)
    assert restored.last == first.state.last and torch.equal(restored.seen, first.state.seen)
    [then] = generate(model, VOCAB, "d", 10, start=restored)
    assert then.generated == generate(model, VOCAB, first.text + "d", 10)[0].generated


def flip(handle: str, part: int) -> str:
    pieces = handle.split(".")
    raw = bytearray(base64.urlsafe_b64decode(pieces[part] + "=" * (-len(pieces[part]) % 4)))
    raw[len(raw) // 2] ^= 1
    pieces[part] = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    return ".".join(pieces)


@pytest.fixture
def sealed(make_model):
    model = make_model(cell="gru", embed_size=8, vocab_size=len(VOCAB))
    [first] = generate(model, VOCAB, "abc", 5, keep_state=True)
    return model, CODEC.encode(first.state, model_identity("m", model, VOCAB), now=1000.0)


@pytest.mark.parametrize("tamper", [lambda h: flip(h, 1), lambda h: flip(h, 2), lambda h: h[:-3],
                                    lambda h: h + "x", lambda h: "ls1.AAAA." + h.split(".")[2],
                                    lambda h: "hello", lambda h: "", lambda h: "ls1.!!.!!"])
def test_altered_or_malformed_handles_are_refused(sealed, tamper):
    with pytest.raises(StateError) as e:
        CODEC.open(tamper(sealed[1]), now=1000.0)
    assert e.value.kind == "invalid"


def test_another_key_is_refused_as_a_forgery(sealed):
    with pytest.raises(StateError, match="signature does not match") as e:
        StateCodec(b"another key", 60).open(sealed[1], now=1000.0)
    assert e.value.kind == "invalid"


def test_an_expired_handle_is_refused(sealed):
    assert CODEC.open(sealed[1], now=1060.0)
    with pytest.raises(StateError, match="expired") as e:
        CODEC.open(sealed[1], now=1061.0)
    assert e.value.kind == "expired"


def test_another_model_is_refused(sealed, make_model):
    model, handle = sealed
    opened = CODEC.open(handle, now=1000.0)
    with pytest.raises(StateError, match="belongs to model 'm'") as e:
        opened.snapshot("other", model, VOCAB)
    assert e.value.kind == "model_mismatch"
    retrained = make_model(cell="gru", embed_size=8, vocab_size=len(VOCAB), seed=1)
    with pytest.raises(StateError, match="has changed") as e:
        opened.snapshot("m", retrained, VOCAB)
    assert e.value.kind == "model_mismatch"
    with pytest.raises(StateError, match="has changed"):
        opened.snapshot("m", model, Vocabulary("abcdefghij\nx"))


def test_a_handle_holds_no_pickle(sealed):
    body = base64.urlsafe_b64decode(sealed[1].split(".")[1] + "==")
    assert not body[4:].startswith(b"\x80")  # after the length: a JSON header, not a pickle stream
    assert body[4:5] == b"{"


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_a_mixture_models_handle_carries_its_cache_history(make_model, cell):
    """A mixture's state is the recurrent state plus the recent characters (int32) its cache reads."""
    rnn = make_model(cell, vocab_size=len(VOCAB), hidden_size=8, embed_size=4, seed=3)
    ngram = KneserNey.fit(VOCAB.encode("abc def\nabc deg\nhij abc\n" * 3), 3, len(VOCAB))
    weights = tuple((0.4, 0.4, 0.2) for _ in range(5))
    model = MixtureLM(rnn, ngram, MixtureConfig(weights=weights, cache_order=4, cache_window=16)).eval()
    params = SamplingParams(temperature=0.9)
    [first] = generate(model, VOCAB, "abc d", 9, params, seed=2, keep_state=True)
    handle = CODEC.encode(first.state, model_identity("mix", model, VOCAB))
    restored = CODEC.open(handle).snapshot("mix", model, VOCAB)
    assert restored.state[-1].dtype == torch.int32
    [then] = generate(model, VOCAB, "ab", 12, params, seed=5, start=restored)
    assert then.generated == generate(model, VOCAB, first.text + "ab", 12, params, seed=5)[0].generated
