"""Structure constraints: the masks hold at every step, the answer says what was met, and
impossible requests are refused before anything runs."""

from __future__ import annotations

import pytest
import torch

from model_store.constraints import ConstraintError, Constraints, Plan, final_of, mask_logits, parse_line_lengths
from model_store.generate import generate
from model_store.model import CharLM, ModelConfig
from model_store.sampling import SamplingParams
from model_store.vocab import Vocabulary

SAMPLED = SamplingParams(temperature=1.0)


def lines_of(text: str, sep: str = "\n") -> list[str]:
    assert text.endswith(sep), repr(text)
    return text[:-1].split(sep)


def biased_model(vocab: Vocabulary, favourite: str, shunned: str = "") -> CharLM:
    """A model that always wants `favourite` most and `shunned` least, whatever it read."""
    model = CharLM(ModelConfig(cell="rnn", vocab_size=len(vocab), hidden_size=4))
    bias = torch.zeros(len(vocab))
    bias[vocab.char_to_idx[favourite]] = 10.0
    for c in shunned:
        bias[vocab.char_to_idx[c]] = -10.0
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.dense.bias.copy_(bias)
    return model.eval()


@pytest.mark.parametrize("params,seed", [(SamplingParams(), None), (SAMPLED, 4), (SamplingParams(0.8, top_k=5), 9)])
def test_a_pattern_gives_lines_of_exactly_those_lengths(trained, params, seed):
    constraints = Constraints(lines=4, line_lengths="7-5-7-5")
    for c in generate(trained.model, trained.vocab, "分开", 100, params, seed=seed, n=3, constraints=constraints):
        assert [len(line) for line in lines_of(c.generated)] == [7, 5, 7, 5]
        assert c.finish_reason == "length"
        assert c.constraints_met == {"lines": True, "line_lengths": True}


def test_a_short_pattern_repeats_and_an_int_fixes_every_line(trained):
    [c] = generate(trained.model, trained.vocab, "我", 100, SAMPLED, seed=1, constraints=Constraints(5, [2, 3]))
    assert [len(line) for line in lines_of(c.generated)] == [2, 3, 2, 3, 2]
    [c] = generate(trained.model, trained.vocab, "我", 100, SAMPLED, seed=1, constraints=Constraints(3, 4))
    assert [len(line) for line in lines_of(c.generated)] == [4, 4, 4]


def test_line_lengths_without_lines_run_to_max_chars(trained):
    [c] = generate(trained.model, trained.vocab, "我", 14, SAMPLED, seed=2, constraints=Constraints(line_lengths=3))
    assert c.generated.split("\n") == [c.generated[0:3], c.generated[4:7], c.generated[8:11], c.generated[12:14]]
    assert c.constraints_met == {"line_lengths": False}  # the last line was cut by max_chars, and says so


def test_free_lines_end_where_the_model_ends_them_and_fit_max_chars(trained):
    for seed in range(6):
        [c] = generate(trained.model, trained.vocab, "你", 12, SAMPLED, seed=seed, constraints=Constraints(lines=3))
        lines = lines_of(c.generated)
        assert len(lines) == 3 and all(lines) and len(c.generated) <= 12
        assert c.constraints_met == {"lines": True}


def test_banned_characters_never_appear_even_when_the_model_wants_them():
    vocab = Vocabulary("abcde\n")
    model = biased_model(vocab, favourite="a")
    assert set(generate(model, vocab, "b", 20)[0].generated) == {"a"}
    for params, seed in ((SamplingParams(), None), (SAMPLED, 3), (SamplingParams(2.0, repetition_penalty=3.0), 1)):
        [c] = generate(model, vocab, "b", 40, params, seed=seed, constraints=Constraints(banned="ae"))
        assert len(c.generated) == 40 and not set(c.generated) & {"a", "e"}
        assert c.constraints_met == {"banned": True}


def test_required_characters_appear_even_when_the_model_shuns_them():
    vocab = Vocabulary("abcdefg\n")
    model = biased_model(vocab, favourite="a", shunned="fg")
    for lines, lengths in ((None, None), (2, 4), (3, None)):
        [c] = generate(model, vocab, "b", 10, constraints=Constraints(lines, lengths, required="gf"))
        assert "f" in c.generated and "g" in c.generated
        assert all(c.constraints_met.values()), (lines, lengths, c)
        # forced as late as possible: only the last free positions take them
        assert c.generated.replace("\n", "").rstrip("fg") == "a" * (len(c.generated.replace("\n", "")) - 2)


def test_rhyme_from_the_first_line(trained):
    vocab = trained.vocab
    for seed in range(4):
        [c] = generate(trained.model, vocab, "我", 100, SAMPLED, seed=seed,
                       constraints=Constraints(lines=4, line_lengths=5, rhyme=True))
        finals = {final_of(line[-1]) for line in lines_of(c.generated)}
        assert len(finals) == 1 and None not in finals, c.generated
        assert c.constraints_met == {"lines": True, "line_lengths": True, "rhyme": True}


def test_rhyme_on_a_named_final(trained):
    [c] = generate(trained.model, trained.vocab, "我", 100, SAMPLED, seed=0,
                   constraints=Constraints(lines=3, line_lengths="4-6-4", rhyme="ai", banned="爱"))
    assert [final_of(line[-1]) for line in lines_of(c.generated)] == ["ai"] * 3
    assert "爱" not in c.generated and all(c.constraints_met.values())


def test_all_constraints_at_once_across_choices(trained):
    constraints = Constraints(lines=4, line_lengths="5-7-5-7", banned="的我", required="风歌", rhyme=True)
    choices = generate(trained.model, trained.vocab, "爱", 200, SAMPLED, seed=7, n=4, constraints=constraints)
    for c in choices:
        assert c.constraints_met == {"lines": True, "line_lengths": True, "banned": True, "required": True,
                                     "rhyme": True}, c.generated


def test_the_separator_is_a_space_for_models_without_line_breaks():
    vocab = Vocabulary("ab c")
    model = biased_model(vocab, favourite=" ")
    [c] = generate(model, vocab, "a", 20, constraints=Constraints(lines=3, line_lengths=2))
    assert c.generated.split(" ")[:-1] != [] and [len(w) for w in c.generated[:-1].split(" ")] == [2, 2, 2]


def test_a_stop_string_can_cut_the_structure_and_the_answer_says_so(trained):
    [c] = generate(trained.model, trained.vocab, "我", 100, SAMPLED, seed=3, stop=["\n"],
                   constraints=Constraints(lines=3, line_lengths=4))
    assert c.finish_reason == "stop" and c.constraints_met == {"lines": False, "line_lengths": False}


def test_unconstrained_rows_are_left_alone():
    logits = torch.randn(3, 6)
    assert mask_logits(logits, [None, None, None]) is logits
    plan = Plan(Constraints(banned="a"), Vocabulary("abcdef"), 5)
    masked = mask_logits(logits, [None, plan.tracker(), None])
    assert torch.equal(masked[[0, 2]], logits[[0, 2]]) and masked[1, 0] == float("-inf")
    assert torch.equal(masked[1, 1:], logits[1, 1:])


@pytest.mark.parametrize("value,expected", [(7, (7,)), ("7-7-7-7", (7, 7, 7, 7)), ("5-7-5", (5, 7, 5)),
                                            ([4, 6], (4, 6)), (None, None)])
def test_line_length_forms(value, expected):
    assert parse_line_lengths(value) == expected


@pytest.mark.parametrize("constraints,max_chars,field,words", [
    (Constraints(banned="ab", required="b"), 10, "required", "both required and banned"),
    (Constraints(required="z"), 10, "required", "cannot write"),
    (Constraints(required="abcd"), 3, "required", "do not fit"),
    (Constraints(lines=2, line_lengths=1, required="abc"), 50, "required", "do not fit"),
    (Constraints(lines=3, line_lengths=4), 14, "line_lengths", "needs 15 characters"),
    (Constraints(lines=4), 7, "lines", "at least 8"),
    (Constraints(lines=0), 7, "lines", "at least 1"),
    (Constraints(line_lengths="7--7"), 50, "line_lengths", "not a pattern"),
    (Constraints(line_lengths=[3, 0]), 50, "line_lengths", "positive"),
    (Constraints(line_lengths="3-99999999999999999999"), 50, "line_lengths", "does not fit"),
    (Constraints(rhyme=True), 50, "rhyme", "needs line_lengths"),
    (Constraints(lines=2, line_lengths=2, rhyme=True), 50, "rhyme", "no character"),
    (Constraints(lines=2, line_lengths=2, rhyme="ang"), 50, "rhyme", "no character"),
    (Constraints(lines=2, banned="\n"), 50, "banned", "separator"),
    (Constraints(lines=2, required="\n"), 50, "required", "separator"),
    (Constraints(banned="abcd\n"), 50, "banned", "every character"),
])
def test_impossible_or_contradictory_constraints_are_refused(constraints, max_chars, field, words):
    with pytest.raises(ConstraintError, match=words) as e:
        Plan(constraints, Vocabulary("abcd\n"), max_chars)
    assert e.value.field == field


def test_finals_come_from_pypinyin():
    assert [final_of(c) for c in "光芒爱开a,"] == ["uang", "ang", "ai", "ai", None, None]
