"""Log-probabilities of generated and prompt characters: the model's own numbers, however a character was chosen."""

from __future__ import annotations

import pytest
import torch

from model_store.batch import Batch, prefill_rows
from model_store.generate import Generation, Request, text_logprobs
from model_store.mixture import MixtureConfig, MixtureLM
from model_store.sampling import SamplingParams, decoding
from model_store.scoring import score_ids
from model_store.vocab import Vocabulary

VOCAB = Vocabulary("abcdefgh \n")


@pytest.fixture
def model(make_model):
    return make_model("gru", vocab_size=len(VOCAB), hidden_size=16, std=0.4)


def run(generation: Generation) -> tuple[list, list]:
    deltas = list(generation)
    return generation.completions, deltas


@pytest.mark.parametrize("params", [SamplingParams(), decoding(), decoding(0.9, top_k=3, best_of=4, best_of_chars=3)],
                         ids=["greedy", "lyric defaults", "best_of"])
def test_each_generated_character_has_the_log_probability_that_scoring_gives_it(model, params):
    [c], _ = run(Generation(model, VOCAB, Request("ab", 30, params, seed=5, logprobs=3)))
    assert len(c.logprobs) == len(c.generated) == 30
    assert VOCAB.decode([lp.id for lp in c.logprobs]) == c.generated
    nll = score_ids(model, VOCAB.encode(c.text), per_char=True).nll[1:]  # the characters after the prefix
    assert [lp.logprob for lp in c.logprobs] == pytest.approx([-x for x in nll], abs=1e-5)
    for lp in c.logprobs:
        assert len(lp.top) == 3 and [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        assert lp.top[0][1] >= lp.logprob - 1e-6  # nothing is likelier than the likeliest
    if params.temperature == 0:
        assert all(lp.top[0][0] == lp.id for lp in c.logprobs)  # greedy takes the likeliest


def test_streamed_deltas_carry_their_characters_log_probabilities(model):
    generation = Generation(model, VOCAB, Request("ab", 40, decoding(best_of=3, best_of_chars=4), stop=["h\n"], seed=2,
                            n=2, logprobs=2))
    completions, deltas = run(generation)
    for c in completions:
        mine = [d for d in deltas if d.index == completions.index(c)]
        assert "".join(d.text for d in mine) == c.generated
        assert [lp for d in mine for lp in d.logprobs] == c.logprobs
        assert all(len(d.logprobs) == len(d.text) for d in mine)


def test_a_stripped_stop_string_takes_its_log_probabilities_with_it(model):
    [free], _ = run(Generation(model, VOCAB, Request("ab", 60, decoding(), seed=3, logprobs=1)))
    stop = free.generated[10:12]
    [c], _ = run(Generation(model, VOCAB, Request("ab", 60, decoding(), stop=[stop], seed=3, logprobs=1)))
    assert c.finish_reason == "stop" and len(c.logprobs) == len(c.generated)
    assert c.logprobs == free.logprobs[:len(c.generated)]


def test_without_logprobs_nothing_is_recorded_and_zero_records_the_characters_alone(model):
    [c], deltas = run(Generation(model, VOCAB, Request("ab", 10, seed=1)))
    assert c.logprobs is None and all(d.logprobs is None for d in deltas)
    [c], _ = run(Generation(model, VOCAB, Request("ab", 10, seed=1, logprobs=0)))
    assert len(c.logprobs) == 10 and all(lp.top == [] for lp in c.logprobs)


def test_a_row_records_the_same_numbers_alone_and_beside_others(model):
    alone, _ = run(Generation(model, VOCAB, Request("ab", 20, decoding(), seed=9, logprobs=2)))
    batch = Batch(model, VOCAB)
    gens = [Generation(model, VOCAB, Request(p, 20, decoding(), seed=s, logprobs=k)) for p, s, k in
            (("ab", 9, 2), ("cd", 1, None), ("ef", 4, 5))]
    rows = [g.rows() for g in gens]
    with torch.no_grad():
        batch.add([r for rs in rows for r in rs], *prefill_rows(model, gens))
        while batch.rows:
            batch.step()
    gens[0].finish(rows[0])
    assert [(lp.id, lp.top) for lp in gens[0].completions[0].logprobs] == [(lp.id, lp.top) for lp in alone[0].logprobs]
    assert [lp.logprob for lp in gens[0].completions[0].logprobs] == pytest.approx(
        [lp.logprob for lp in alone[0].logprobs], abs=1e-5)


def test_prompt_log_probabilities_match_those_of_generated_characters(model):
    [c], _ = run(Generation(model, VOCAB, Request("abc", 12, SamplingParams(), logprobs=2)))
    scored = text_logprobs(model, VOCAB.encode(c.text), 2)
    assert len(scored) == len(c.text) - 1
    assert [s.id for s in scored[2:]] == [lp.id for lp in c.logprobs]
    assert [s.logprob for s in scored[2:]] == pytest.approx([lp.logprob for lp in c.logprobs], abs=1e-5)
    assert text_logprobs(model, VOCAB.encode("a"), 2) == []


def test_a_mixture_reports_the_numbers_of_the_recurrent_model_that_writes(model):
    mixture = MixtureLM(model, None, MixtureConfig(weights=((0.5, 0.0, 0.5),) * 7)).eval()
    [c], _ = run(Generation(mixture, VOCAB, Request("ab", 15, SamplingParams(), logprobs=1)))
    [plain], _ = run(Generation(model, VOCAB, Request("ab", 15, SamplingParams(), logprobs=1)))
    assert c.generated == plain.generated
    assert [lp.logprob for lp in c.logprobs] == pytest.approx([lp.logprob for lp in plain.logprobs], abs=1e-5)
