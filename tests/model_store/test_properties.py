"""Property tests on the core: for any Unicode prefix and any in-range sampling settings,
`generate` and `score_text` either answer within their contract or raise one of the
documented errors (UnknownCharactersError naming exactly the missing characters,
ValueError for an empty prefix / too short a text)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from model_store.generate import generate
from model_store.model import CharLM, ModelConfig
from model_store.sampling import SamplingParams
from model_store.scoring import score_text
from model_store.vocab import UnknownCharactersError, Vocabulary

VOCAB = Vocabulary.from_text("分开的爱 我不要\nabc xyz")
FIXED = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", params=["rnn", "gru", "lstm"])
def model(request) -> CharLM:
    torch.manual_seed(0)
    m = CharLM(ModelConfig(cell=request.param, vocab_size=len(VOCAB), hidden_size=8,
                           embed_size=4 if request.param == "lstm" else 0))
    return m.eval()


# Any characters but surrogates (not encodable text), mixed with vocabulary characters so that
# both the accepted and the refused paths are taken often.
ANY_CHAR = st.characters(exclude_categories=("Cs",))
TEXT = st.one_of(
    st.text(ANY_CHAR, max_size=200),
    st.text(st.sampled_from(VOCAB.idx_to_char), max_size=200),
    st.lists(st.one_of(st.sampled_from(VOCAB.idx_to_char), ANY_CHAR), max_size=200).map("".join),
)
PARAMS = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(0.0, 100.0, allow_nan=False)),
    top_k=st.integers(0, 50),
    top_p=st.floats(1e-6, 1.0, allow_nan=False),
    repetition_penalty=st.floats(1e-3, 100.0, allow_nan=False),
)
# Single vocabulary characters make stop strings that are actually generated; the rest rarely are.
STOP = st.lists(st.one_of(st.sampled_from(VOCAB.idx_to_char),
                          st.text(st.one_of(st.sampled_from(VOCAB.idx_to_char), ANY_CHAR), max_size=4)), max_size=4)


def expected_unknown(text: str) -> list[str]:
    return list(dict.fromkeys(c for c in text if c not in VOCAB))


@FIXED
@given(prefix=TEXT, params=PARAMS, max_chars=st.integers(0, 60), n=st.integers(1, 4), stop=STOP,
       seed=st.one_of(st.none(), st.integers(0, 2**53 - 1)))
def test_generate_keeps_its_contract(model, prefix, params, max_chars, n, stop, seed):
    try:
        completions = generate(model, VOCAB, prefix, max_chars, params, stop, seed, n)
    except UnknownCharactersError as e:
        event("refused: unknown characters")
        assert prefix and e.unknown == expected_unknown(prefix)
        return
    except ValueError:
        event("refused: empty prefix")
        assert prefix == ""
        return
    assert prefix and not expected_unknown(prefix)
    assert len(completions) == n
    live_stop = [s for s in stop if s]
    for i, c in enumerate(completions):
        assert c.text == prefix + c.generated
        assert all(ch in VOCAB for ch in c.generated)
        assert len(c.generated) <= max_chars
        assert c.finish_reason in {"length", "stop"}
        event(f"finish: {c.finish_reason}")
        if c.finish_reason == "length":
            assert len(c.generated) == max_chars
        else:
            assert live_stop and len(c.generated) < max_chars
        assert not any(s in c.generated for s in live_stop)  # it stops at the first one, which is removed
        assert c.seed == (None if params.temperature == 0 else (c.seed if seed is None else seed + i))


@FIXED
@given(text=TEXT, unknown=st.sampled_from(["error", "skip"]))
def test_score_text_keeps_its_contract(model, text, unknown):
    missing = expected_unknown(text)
    kept = "".join(c for c in text if c in VOCAB)
    try:
        score = score_text(model, VOCAB, text, unknown)
    except UnknownCharactersError as e:
        event("refused: unknown characters")
        assert unknown == "error" and missing and e.unknown == missing
        return
    except ValueError:
        event("refused: fewer than two characters")
        assert len(kept) < 2 and (unknown == "skip" or not missing)
        return
    event(f"scored, {unknown}")
    assert unknown == "skip" or not missing
    assert score.chars_scored == len(kept) - 1
    assert score.unknown_skipped == len(text) - len(kept)
    assert math.isfinite(score.cross_entropy) and score.cross_entropy >= 0
    assert score.perplexity == pytest.approx(math.exp(score.cross_entropy))
