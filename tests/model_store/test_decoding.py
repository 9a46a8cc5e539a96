"""The lyric decoding defaults, no blank runs and best_of: what a request that names nothing gets."""

from __future__ import annotations

import re

import pytest
import torch

from model_store.constraints import Constraints
from model_store.generate import Generation, Request, candidate_seed, generate
from model_store.mixture import MixtureConfig, MixtureLM, for_generation
from model_store.sampling import LYRIC_DEFAULTS, SamplingParams, decoding
from model_store.scoring import score_ids
from model_store.vocab import Vocabulary

VOCAB = Vocabulary("abcdefgh \n")
BLANK_RUNS = ("  ", " \n", "\n ", "\n\n")


@pytest.fixture
def model(make_model):
    return make_model("gru", vocab_size=len(VOCAB), hidden_size=16, std=0.4)


def test_omitted_fields_take_the_lyric_defaults_when_sampled():
    assert decoding() == SamplingParams(0.9, 0, 0.95, 1.0, 4, True, 8, 5, 2, 6)
    assert LYRIC_DEFAULTS == {"temperature": 0.9, "top_p": 0.95, "no_repeat_ngram": 4, "no_blank_runs": True,
                              "best_of": 8, "best_of_chars": 5, "max_char_run": 2, "min_line_chars": 6}
    assert decoding(temperature=1.2).temperature == 1.2 and decoding(temperature=1.2).best_of == 8


def test_temperature_zero_is_plain_greedy_unless_a_rule_is_asked_for():
    assert decoding(temperature=0) == SamplingParams()  # the tutorial's predict, as before
    assert decoding(temperature=0, no_repeat_ngram=3).no_repeat_ngram == 3
    assert decoding(temperature=0, no_blank_runs=True).no_blank_runs
    assert decoding(temperature=0, max_char_run=1).max_char_run == 1
    assert decoding(temperature=0, min_line_chars=3).min_line_chars == 3


def test_given_fields_win_over_the_defaults():
    p = decoding(0.5, top_k=7, top_p=0.5, no_repeat_ngram=0, no_blank_runs=False, best_of=1, best_of_chars=9,
                 max_char_run=0, min_line_chars=0)
    assert p == SamplingParams(0.5, 7, 0.5, 1.0, 0, False, 1, 9, 0, 0)


@pytest.mark.parametrize("field, value", [("best_of", 0), ("best_of", 65), ("best_of_chars", 0),
                                          ("max_char_run", -1), ("max_char_run", 1001),
                                          ("min_line_chars", -1), ("min_line_chars", 1001)])
def test_out_of_range_best_of_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_no_blank_runs_never_puts_a_blank_after_a_blank(make_model):
    # a model that likes blanks: flat logits at a high temperature draw them often
    model = make_model("rnn", vocab_size=len(VOCAB), hidden_size=8, std=0.05)
    free = SamplingParams(temperature=3.0)
    ruled = SamplingParams(temperature=3.0, no_blank_runs=True)
    texts = {rule: [generate(model, VOCAB, "a ", 200, rule, seed=s)[0].generated for s in range(5)]
             for rule in (free, ruled)}
    assert any(run in " " + t for t in texts[free] for run in BLANK_RUNS)  # the rule is what removes them
    for text in texts[ruled]:
        assert not text[0].isspace()  # the prefix ended with a blank
        assert not any(run in text for run in BLANK_RUNS), text


def longest_run(text: str) -> int:
    return max(len(m.group(0)) for m in re.finditer(r"(.)\1*", text, re.S))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_max_char_run_never_writes_a_character_more_than_k_times_in_a_row(make_model, k):
    # a model that repeats itself: near-flat logits over a tiny vocabulary at a low temperature draw runs often
    vocab = Vocabulary("ab")
    model = make_model("rnn", vocab_size=2, hidden_size=4, std=0.05)
    free = [generate(model, vocab, "a", 200, SamplingParams(temperature=0.5), seed=s)[0].text for s in range(4)]
    assert max(longest_run(t) for t in free) > k  # runs happen without the rule
    for seed in range(4):
        [c] = generate(model, vocab, "a" * k, 200, SamplingParams(temperature=0.5, max_char_run=k), seed=seed)
        assert longest_run(c.text) <= k, c.text  # the prefix's own run counts: its k a's end it
        assert len(c.generated) == 200 and c.generated[0] == "b"


def test_max_char_run_holds_with_best_of_and_each_choice_equals_it_alone(model):
    params = SamplingParams(temperature=2.0, max_char_run=1, best_of=3, best_of_chars=2)
    texts = [c.generated for c in generate(model, VOCAB, "ab", 60, params, seed=4, n=3)]
    assert all(longest_run(t) == 1 for t in texts), texts
    alone = [generate(model, VOCAB, "ab", 60, params, seed=4 + i)[0].generated for i in range(3)]
    assert texts == alone


def line_lengths_of(text: str) -> list[int]:
    """Lengths of the lines a line break ended (the last, open line left out)."""
    return [len(line) for line in text.split("\n")[:-1]]


@pytest.mark.parametrize("k", [2, 5])
def test_min_line_chars_never_ends_a_line_shorter_than_k(make_model, k):
    # a model that likes line breaks: a tiny vocabulary, near-flat logits, a high temperature
    vocab = Vocabulary("ab\n")
    model = make_model("rnn", vocab_size=3, hidden_size=4, std=0.05)
    free = [generate(model, vocab, "a\nb", 200, SamplingParams(temperature=2.0), seed=s)[0].text for s in range(4)]
    assert min(min(line_lengths_of(t)) for t in free) < k  # short lines happen without the rule
    for seed in range(4):
        [c] = generate(model, vocab, "a\nb", 200, SamplingParams(temperature=2.0, min_line_chars=k), seed=seed)
        assert "\n" in c.generated and len(c.generated) == 200
        # the prefix's last line ("b") counts: its first break comes after k characters, "b" included
        assert min(line_lengths_of(c.text)[1:]) >= k, c.text


def test_min_line_chars_holds_with_best_of_and_each_choice_equals_it_alone(model):
    params = SamplingParams(temperature=2.0, min_line_chars=4, best_of=3, best_of_chars=2)
    texts = [c.text for c in generate(model, VOCAB, "ab", 80, params, seed=4, n=3)]
    assert all(min(line_lengths_of(t), default=4) >= 4 for t in texts), texts
    alone = [generate(model, VOCAB, "ab", 80, params, seed=4 + i)[0].text for i in range(3)]
    assert texts == alone


def test_a_structure_constraint_asking_for_shorter_lines_wins_over_min_line_chars(model):
    params = SamplingParams(temperature=1.0, min_line_chars=6)
    [c] = generate(model, VOCAB, "a", 20, params, seed=3, constraints=Constraints(lines=2, line_lengths=3))
    assert line_lengths_of(c.generated) == [3, 3], c.generated
    assert c.constraints_met == {"lines": True, "line_lengths": True}


def test_best_of_compared_only_at_the_end_returns_the_likeliest_of_its_candidates(model):
    """With best_of_chars past max_chars the candidates are compared once, when they finish: the answer
    is the candidate (each drawn alone from its own stream) that the model finds likeliest."""
    prefix, length, seed, k = "ab", 30, 11, 5
    one = SamplingParams(temperature=1.0, top_p=0.9)
    candidates = [generate(model, VOCAB, prefix, length, one, seed=candidate_seed(seed, j))[0].generated
                  for j in range(k)]
    assert len(set(candidates)) == k  # different streams

    def loglik(text):
        nll = score_ids(model, VOCAB.encode(prefix + text), per_char=True).nll  # of every character but the first
        return -sum(nll[len(prefix) - 1:])

    best = max(candidates, key=loglik)
    params = SamplingParams(temperature=1.0, top_p=0.9, best_of=k, best_of_chars=1000)
    assert generate(model, VOCAB, prefix, length, params, seed=seed)[0].generated == best


def test_best_of_is_reproducible_and_each_choice_equals_it_alone(model):
    params = decoding(best_of=4, best_of_chars=3)
    alone = generate(model, VOCAB, "ab", 40, params, seed=5)[0]
    assert generate(model, VOCAB, "ab", 40, params, seed=5)[0] == alone
    together = generate(model, VOCAB, "ab", 40, params, seed=5, n=3)  # 12 rows in one batch
    assert together[0] == alone and len(together) == 3
    assert [c.seed for c in together] == [5, 6, 7]
    assert together[1] == generate(model, VOCAB, "ab", 40, params, seed=6)[0]


def test_best_of_streams_exactly_its_final_text(model):
    generation = Generation(model, VOCAB, Request("ab", 37, decoding(best_of=3, best_of_chars=4), seed=2, n=2))
    streamed = {0: "", 1: ""}
    for delta in generation:
        streamed[delta.index] += delta.text
    assert [streamed[0], streamed[1]] == [c.generated for c in generation.completions]
    assert all(len(c.generated) == 37 for c in generation.completions)


def test_best_of_keeps_stop_strings_and_constraints(model):
    params = decoding(best_of=4, best_of_chars=2, no_repeat_ngram=0)
    stopped = generate(model, VOCAB, "ab", 200, params, stop=["c"], seed=3)[0]
    assert stopped.finish_reason == "stop" and "c" not in stopped.generated
    shaped = generate(model, VOCAB, "ab\n", 30, params, seed=3,
                      constraints=Constraints(lines=3, line_lengths=[4, 2, 3], banned="h"))[0]
    assert [len(line) for line in shaped.generated.split("\n")[:3]] == [4, 2, 3]
    assert "h" not in shaped.generated and all(shaped.constraints_met.values())


def test_a_row_budget_counts_every_candidate(model):
    assert Request("ab", 10, decoding(best_of=6), n=2).row_count == 12
    assert Request("ab", 10, decoding(temperature=0), n=2).row_count == 2


def test_a_mixture_generates_from_its_recurrent_model_alone_and_still_scores_with_its_cache(model):
    order = 3
    mixture = MixtureLM(model, None, MixtureConfig(((0.5, 0.0, 0.5),) * (order + 1), order, 64)).eval()
    assert for_generation(mixture) is for_generation(mixture)  # one view per model (the engine keys on it)
    assert for_generation(model) is model
    for params in (SamplingParams(), decoding(best_of=2)):
        assert generate(mixture, VOCAB, "abab", 30, params, seed=1)[0] == generate(model, VOCAB, "abab", 30, params,
                                                                                       seed=1)[0]
    ids = torch.tensor(VOCAB.encode("abcabcabcabc"))
    assert score_ids(mixture, ids).cross_entropy < score_ids(model, ids).cross_entropy  # the cache, in scoring
