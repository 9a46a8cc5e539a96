import math
from collections import Counter

import pytest
import torch

from model_store import kernels
from model_store.generate import Generation, Request, generate
from model_store.model import CharLM, ModelConfig
from model_store.sampling import SamplingParams, Uniforms, sample_next
from model_store.vocab import UnknownCharactersError, Vocabulary, one_hot

VOCAB12 = Vocabulary("abcdefghijkl")


def predict_rnn(model: CharLM, prefix: str, num_chars: int, char_to_idx: dict, idx_to_char: list) -> str:
    """The tutorial's `predict_rnn`, with its one-layer RNN step written out with explicit
    matmuls on the model's weights."""
    rnn = model.rnn
    W_xh, W_hh, b_h = rnn.weight_ih_l0.T, rnn.weight_hh_l0.T, rnn.bias_ih_l0 + rnn.bias_hh_l0
    W_hq, b_q = model.dense.weight.T, model.dense.bias
    V = len(idx_to_char)
    H = torch.zeros(1, W_hh.shape[0])
    output = [char_to_idx[prefix[0]]]
    with torch.no_grad():
        for t in range(num_chars + len(prefix) - 1):
            X = one_hot(torch.tensor([output[-1]]), V)
            H = torch.tanh(X @ W_xh + H @ W_hh + b_h)
            Y = H @ W_hq + b_q
            if t < len(prefix) - 1:
                output.append(char_to_idx[prefix[t + 1]])
            else:
                output.append(int(Y.argmax(dim=1).item()))
    return "".join(idx_to_char[i] for i in output)


def constant_model(vocab_size: int, bias: list[float]) -> CharLM:
    """A model whose logits are `bias` whatever the input: all other weights are zero."""
    model = CharLM(ModelConfig(cell="rnn", vocab_size=vocab_size, hidden_size=4))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.dense.bias.copy_(torch.tensor(bias))
    return model.eval()


# Greedy is the tutorial's predict ------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["分开", "不分开", "la la", "我"])
def test_greedy_equals_the_tutorials_predict_rnn_on_a_trained_model(trained, prefix):
    model, vocab = trained.model, trained.vocab
    assert model.config.cell == "rnn" and model.config.num_layers == 1 and model.config.embed_size == 0
    expected = predict_rnn(model, prefix, 60, vocab.char_to_idx, vocab.idx_to_char)
    [c] = generate(model, vocab, prefix, max_chars=60, params=SamplingParams(temperature=0.0))
    assert c.text == expected
    assert c.generated == expected[len(prefix):]
    assert c.finish_reason == "length" and c.seed is None


def test_the_trained_model_continues_the_lyric(trained, lyric):
    """The trained fixture has learnt its periodic corpus; greedy continues the lyric."""
    [c] = generate(trained.model, trained.vocab, "分开", max_chars=20)
    assert c.text in lyric * 2


def spread_rnn(make_model, seed):
    """Random one-hot RNN weights with spread logits (std 0.6, far above torch's init) and a
    contracting recurrence (W_hh std 0.12): a chaotic one would amplify float rounding."""
    model = make_model("rnn", vocab_size=len(VOCAB12), hidden_size=24, std=0.6, seed=seed)
    with torch.no_grad():
        model.rnn.weight_hh_l0.normal_(0.0, 0.12)
    return model


def test_the_models_rnn_step_is_the_tutorials_rnn_step(make_model):
    model = spread_rnn(make_model, 0)
    rnn = model.rnn
    W_xh, W_hh, b_h = rnn.weight_ih_l0.T, rnn.weight_hh_l0.T, rnn.bias_ih_l0 + rnn.bias_hh_l0
    W_hq, b_q = model.dense.weight.T, model.dense.bias
    ids = torch.tensor(VOCAB12.encode("cabbage" * 3))
    H, outputs = torch.zeros(1, 24), []
    with torch.no_grad():
        for i in ids:
            H = torch.tanh(one_hot(i[None], 12) @ W_xh + H @ W_hh + b_h)
            outputs.append(H @ W_hq + b_q)
        logits, state = model(ids[None])
    torch.testing.assert_close(logits[0], torch.cat(outputs), atol=1e-5, rtol=0)
    torch.testing.assert_close(state[0], H, atol=1e-5, rtol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_equals_the_tutorials_predict_rnn_on_random_weights(make_model, seed):
    model = spread_rnn(make_model, seed)
    prefix = "cab"
    expected = predict_rnn(model, prefix, 80, VOCAB12.char_to_idx, VOCAB12.idx_to_char)
    [c] = generate(model, VOCAB12, prefix, max_chars=80)
    assert c.text == expected
    assert len(set(c.generated)) > 2  # not a degenerate constant output


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_scratch_and_fused_generate_the_same_greedy_text(make_model, cell):
    model = make_model(cell, vocab_size=len(VOCAB12), hidden_size=16, num_layers=2, embed_size=6, std=1.0)
    model.impl = "fused"
    fused = generate(model, VOCAB12, "hijack", max_chars=60)[0].generated
    model.impl = "scratch"
    scratch = generate(model, VOCAB12, "hijack", max_chars=60)[0].generated
    assert scratch == fused
    assert len(set(fused)) >= 3


def test_greedy_does_not_touch_the_global_torch_rng(trained):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    generate(trained.model, trained.vocab, "分开", max_chars=30, params=SamplingParams(temperature=0.8), seed=4)
    generate(trained.model, trained.vocab, "分开", max_chars=30)
    assert torch.equal(torch.get_rng_state(), before)


# Seeds --------------------------------------------------------------------------------------

SAMPLED = SamplingParams(temperature=1.0)


@pytest.fixture
def wild(make_model):
    """Random weights with spread logits: sampled text varies a lot from seed to seed."""
    return make_model("gru", vocab_size=len(VOCAB12), hidden_size=16, embed_size=4, std=0.3)


def test_the_same_seed_gives_the_same_text(wild):
    a = generate(wild, VOCAB12, "abc", max_chars=40, params=SAMPLED, seed=7)[0]
    torch.manual_seed(999)  # the global RNG plays no part
    b = generate(wild, VOCAB12, "abc", max_chars=40, params=SAMPLED, seed=7)[0]
    assert a.generated == b.generated
    assert a.seed == b.seed == 7


def test_different_seeds_give_different_texts(wild):
    texts = {generate(wild, VOCAB12, "abc", max_chars=40, params=SAMPLED, seed=s)[0].generated for s in range(5)}
    assert len(texts) == 5


def test_a_sampled_request_without_a_seed_reports_the_seed_that_reproduces_it(wild):
    first = generate(wild, VOCAB12, "abc", max_chars=40, params=SAMPLED)[0]
    assert isinstance(first.seed, int)
    again = generate(wild, VOCAB12, "abc", max_chars=40, params=SAMPLED, seed=first.seed)[0]
    assert again.generated == first.generated


def test_choice_i_of_n_equals_a_single_request_with_seed_plus_i(wild):
    many = generate(wild, VOCAB12, "abc", max_chars=40, params=SAMPLED, seed=100, n=4)
    assert [c.seed for c in many] == [100, 101, 102, 103]
    for i, c in enumerate(many):
        [one] = generate(wild, VOCAB12, "abc", max_chars=40, params=SAMPLED, seed=100 + i)
        assert c.generated == one.generated
        assert c.text == "abc" + c.generated
    assert len({c.generated for c in many}) == 4


def test_greedy_with_n_gives_n_identical_choices(wild):
    many = generate(wild, VOCAB12, "abc", max_chars=30, n=3)
    assert len(many) == 3
    assert len({c.generated for c in many}) == 1
    assert all(c.seed is None for c in many)


# Sampling settings that reduce to greedy -------------------------------------------------------


def test_top_k_1_equals_greedy(wild):
    greedy = generate(wild, VOCAB12, "abc", max_chars=50)[0].generated
    for seed in range(3):
        params = SamplingParams(temperature=1.5, top_k=1)
        assert generate(wild, VOCAB12, "abc", max_chars=50, params=params, seed=seed)[0].generated == greedy


def test_a_tiny_top_p_equals_greedy(wild):
    greedy = generate(wild, VOCAB12, "abc", max_chars=50)[0].generated
    for seed in range(3):
        params = SamplingParams(temperature=1.5, top_p=1e-6)
        assert generate(wild, VOCAB12, "abc", max_chars=50, params=params, seed=seed)[0].generated == greedy


def test_sampling_is_not_greedy(wild):
    """Guards the two tests above: plain sampling with these seeds does differ from greedy."""
    greedy = generate(wild, VOCAB12, "abc", max_chars=50)[0].generated
    assert all(generate(wild, VOCAB12, "abc", max_chars=50, params=SamplingParams(temperature=1.5),
                        seed=s)[0].generated != greedy for s in range(3))


# Repetition penalty -------------------------------------------------------------------------


def repeats(text: str) -> int:
    return sum(a == b for a, b in zip(text, text[1:], strict=False))


def test_repetition_penalty_breaks_a_loop():
    # logits never change: greedy without a penalty repeats 'a' for ever
    model = constant_model(6, [3.0, 2.9, 2.8, 2.7, 2.6, 2.5])
    vocab = Vocabulary("abcdef")
    plain = generate(model, vocab, "f", max_chars=20)[0].generated
    assert plain == "a" * 20
    penalised = generate(model, vocab, "f", max_chars=20, params=SamplingParams(repetition_penalty=1.5))[0].generated
    # each seen character is pushed below the unseen ones (3.0 / 1.5 < 2.6); once all are
    # seen, 'a' leads again
    assert penalised == "abcde" + "a" * 15
    assert repeats(penalised) < repeats(plain)


def test_repetition_penalty_reduces_repeats_on_a_model_that_loops(make_model):
    # a one-hot RNN whose output strongly prefers repeating a few characters
    model = make_model("rnn", vocab_size=len(VOCAB12), hidden_size=8, std=0.3, seed=3)
    with torch.no_grad():
        model.dense.bias.copy_(torch.linspace(2.0, 0.0, len(VOCAB12)))
    plain = generate(model, VOCAB12, "l", max_chars=60)[0].generated
    penalised = generate(model, VOCAB12, "l", max_chars=60,
                         params=SamplingParams(repetition_penalty=3.0))[0].generated
    assert len(set(penalised[:12])) > len(set(plain[:12]))


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_characters():
    seen = torch.tensor([[True, False, False]])
    greedy = [SamplingParams(repetition_penalty=4.0)]
    # positive: 3 / 4 = 0.75 < 1.0
    assert sample_next(torch.tensor([[3.0, -1.0, 1.0]]), greedy, seen, [None]).item() == 2
    # negative: -0.5 * 4 = -2 < -0.8
    assert sample_next(torch.tensor([[-0.5, -1.0, -0.8]]), greedy, seen, [None]).item() == 2
    # unseen characters and penalty 1 are untouched
    assert sample_next(torch.tensor([[-0.5, -1.0, -0.8]]), [SamplingParams()], seen, [None]).item() == 0
    assert sample_next(torch.tensor([[-0.5, -1.0, -0.8]]), greedy, None, [None]).item() == 0


# Stop strings and lengths ---------------------------------------------------------------------


def test_a_stop_string_ends_generation_and_is_not_included(trained):
    full = generate(trained.model, trained.vocab, "分开", max_chars=40)[0].generated
    assert "\n" in full and "love" in full
    [c] = generate(trained.model, trained.vocab, "分开", max_chars=40, stop=["\n"])
    assert c.finish_reason == "stop"
    assert c.generated == full[: full.index("\n")]
    assert c.text == "分开" + c.generated
    [c] = generate(trained.model, trained.vocab, "分开", max_chars=40, stop=["love", "zzz"])
    assert c.finish_reason == "stop"
    assert c.generated == full[: full.index("love")]


def test_a_stop_string_that_never_appears_lets_generation_run_to_the_limit(trained):
    [c] = generate(trained.model, trained.vocab, "分开", max_chars=25, stop=["龙龙", ""])
    assert c.finish_reason == "length" and len(c.generated) == 25


def test_max_chars_caps_the_length(trained):
    for max_chars in (1, 7, 33):
        [c] = generate(trained.model, trained.vocab, "分开", max_chars=max_chars)
        assert c.finish_reason == "length"
        assert len(c.generated) == max_chars


def test_max_chars_zero_generates_nothing(trained):
    [c] = generate(trained.model, trained.vocab, "分开", max_chars=0)
    assert c.generated == "" and c.text == "分开" and c.finish_reason == "length"


def test_rows_stop_independently(wild):
    many = generate(wild, VOCAB12, "abc", max_chars=40, params=SAMPLED, seed=100, n=4)
    stop = many[1].generated[5:7]  # a string that row 1 certainly produces
    stopped = generate(wild, VOCAB12, "abc", max_chars=40, params=SAMPLED, seed=100, n=4, stop=[stop])
    for full, c in zip(many, stopped, strict=True):
        if stop in full.generated:
            assert c.finish_reason == "stop"
            assert c.generated == full.generated[: full.generated.index(stop)]
        else:
            assert c.finish_reason == "length" and c.generated == full.generated
    assert stopped[1].finish_reason == "stop" and len(stopped[1].generated) <= 5


def test_streamed_deltas_add_up_to_the_completions_and_never_show_a_stop_string(trained):
    stop = "love"
    gen = Generation(trained.model, trained.vocab, Request("分开", max_chars=40, stop=[stop]))
    deltas = list(gen)
    streamed = "".join(d.text for d in deltas)
    [c] = gen.completions
    assert streamed == c.generated
    assert c.finish_reason == "stop"
    assert all(stop[:2] not in d.text for d in deltas)
    assert len(deltas) > 1  # text arrives as it is produced


def test_an_empty_prefix_is_rejected(trained):
    with pytest.raises(ValueError, match="prefix"):
        generate(trained.model, trained.vocab, "", max_chars=5)


def test_negative_max_chars_and_zero_n_are_rejected(trained):
    with pytest.raises(ValueError):
        generate(trained.model, trained.vocab, "分开", max_chars=-1)
    with pytest.raises(ValueError):
        generate(trained.model, trained.vocab, "分开", n=0)


def test_unknown_prefix_characters_are_rejected_by_name(trained):
    with pytest.raises(UnknownCharactersError) as info:
        generate(trained.model, trained.vocab, "分开Q龙", max_chars=5)
    assert info.value.unknown == ["Q", "龙"]


@pytest.mark.parametrize("bad", [
    dict(temperature=-0.1), dict(temperature=101.0), dict(temperature=math.nan),
    dict(top_k=-1),
    dict(top_p=0.0), dict(top_p=1.01), dict(top_p=-0.5),
    dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0), dict(repetition_penalty=101.0),
])
def test_sampling_params_reject_out_of_range_values(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_sampling_params_accept_their_boundaries():
    assert SamplingParams() == SamplingParams(temperature=0.0, top_k=0, top_p=1.0, repetition_penalty=1.0)
    hot = SamplingParams(temperature=100.0, top_k=5, top_p=1e-9, repetition_penalty=100.0)
    assert (hot.temperature, hot.top_k, hot.top_p, hot.repetition_penalty) == (100.0, 5, 1e-9, 100.0)


# sample_next's distribution -----------------------------------------------------------------

PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
N_DRAWS = 20000


@pytest.fixture(params=["C kernels", "torch ops"])
def sampler(request, monkeypatch):
    """Runs a test with the sampler's rounds in C (kernels.Sampler) and as torch ops."""
    if request.param == "C kernels" and kernels.library() is None:
        pytest.skip("the C kernels could not be built here (no C compiler?)")
    monkeypatch.setattr(kernels, "ENABLED", request.param == "C kernels")


def draw(params: SamplingParams, logits_row: torch.Tensor = PROBS.log(), seed=0) -> Counter:
    """N_DRAWS draws from one logits row (one row per draw, all sharing one random stream)."""
    g = Uniforms(seed)
    logits = logits_row.repeat(N_DRAWS, 1)
    picks = sample_next(logits, [params] * N_DRAWS, None, [g] * N_DRAWS)
    return Counter(picks.tolist())


def assert_frequencies(counts: Counter, probs: torch.Tensor, tol=0.015):
    for i, p in enumerate(probs.tolist()):
        assert abs(counts[i] / N_DRAWS - p) < tol, (i, counts[i] / N_DRAWS, p)


def test_temperature_1_samples_the_softmax(sampler):
    # shuffled order: the sampler must map back from sorted order correctly
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    probs = PROBS[perm]
    counts = draw(SamplingParams(temperature=1.0), probs.log())
    assert set(counts) == set(range(6))
    assert_frequencies(counts, probs)


def test_temperature_scales_the_logits_before_the_softmax(sampler):
    logits = PROBS.log()
    counts = draw(SamplingParams(temperature=0.5), logits)
    assert_frequencies(counts, torch.softmax(logits / 0.5, dim=0))


def test_top_k_2_only_ever_picks_the_two_likeliest(sampler):
    counts = draw(SamplingParams(temperature=1.0, top_k=2))
    assert set(counts) == {0, 1}
    assert_frequencies(counts, torch.tensor([0.4, 0.25]) / 0.65)


@pytest.mark.parametrize("top_p,survivors", [(0.3, 1), (0.6, 2), (0.7, 3), (0.85, 4), (0.95, 5), (1.0, 6)])
def test_top_p_keeps_the_smallest_set_that_reaches_p(top_p, survivors, sampler):
    # cumulative: 0.4, 0.65, 0.8, 0.9, 0.96, 1.0
    counts = draw(SamplingParams(temperature=1.0, top_p=top_p))
    assert set(counts) == set(range(survivors))
    kept = PROBS[:survivors]
    assert_frequencies(counts, kept / kept.sum())


def test_each_row_uses_its_own_settings_and_stream(sampler):
    logits = PROBS.log().repeat(3, 1)
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0)]
    picks = [sample_next(logits, params, None, [None, Uniforms(1), Uniforms(s)]).tolist()
             for s in range(40)]
    assert all(p[0] == 0 and p[1] == 0 for p in picks)  # greedy row, top-k 1 row
    assert len({p[2] for p in picks}) > 3  # the sampled row varies with its own seed


@pytest.mark.parametrize("scale", [0.5, 3.0, 20.0])
def test_sampling_from_a_sorted_head_equals_sampling_from_the_whole_sorted_vocabulary(monkeypatch, scale):
    import model_store.sampling as g

    logits = torch.randn(16, 3000, generator=torch.Generator().manual_seed(0)) * scale
    probs = torch.softmax(logits, dim=1)
    top_k = torch.tensor([3000, 3000, 3000, 100] * 4)[:, None]  # 3000: no limit
    top_p = torch.tensor([0.9, 1.0, 0.5, 1.0] * 4)[:, None]
    fast = [g.sample_sorted(probs, top_k, top_p, [Uniforms(i) for i in range(16)]) for _ in range(3)]
    monkeypatch.setattr(g, "sorted_head", lambda probs, top_k, top_p: probs.sort(dim=1, descending=True))
    whole = [g.sample_sorted(probs, top_k, top_p, [Uniforms(i) for i in range(16)]) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(fast, whole, strict=True))


def nucleus(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The top-k/top-p survivors' renormalised distribution, by sorting (the textbook definition)."""
    sorted_probs, order = probs.sort(descending=True)
    keep = ((sorted_probs.cumsum(0) - sorted_probs) < top_p) & (torch.arange(len(probs)) < (top_k or len(probs)))
    out = torch.zeros_like(probs)
    out[order[keep]] = sorted_probs[keep]
    return out / out.sum()


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (0, 0.5), (5, 1.0), (40, 0.9), (2, 1.0), (0, 0.05)])
def test_sampling_by_rejection_draws_the_survivors_distribution(top_k, top_p, sampler):
    # 50 characters, a peaked distribution: survivors are accepted at the first try (top_p 0.9) or
    # after several (top_k 2, top_p 0.05: the sorted fallback takes the rows rejected four times)
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3)) * 2
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p)
    counts = draw(params, logits)
    expected = nucleus(torch.softmax(logits, dim=0), top_k, top_p)
    assert set(counts) == set(expected.nonzero()[:, 0].tolist())
    for i, p in enumerate(expected.tolist()):
        assert abs(counts[i] / N_DRAWS - p) < 0.015, (i, counts[i] / N_DRAWS, p)


class AlmostOne:
    """A stream whose every uniform is just below 1: as float32 it rounds to 1.0."""

    def next(self) -> float:
        return 1 - 1e-12


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, top_p=0.9),
                                    SamplingParams(temperature=1.0, top_k=2)])
def test_a_uniform_that_rounds_to_one_never_picks_a_character_of_probability_zero(params):
    logits = torch.tensor([[1.0, 2.0, 0.5, float("-inf")]])  # the last character is ruled out
    pick = sample_next(logits, [params], None, [AlmostOne()]).item()
    assert pick != 3 and torch.softmax(logits, dim=1)[0, pick] > 0


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 0.5)])
def test_a_vanishing_temperature_samples_the_argmax(top_k, top_p):
    # 5e-324 / any logit overflows float32: without care the probabilities would be NaN
    logits = torch.tensor([[1.0, 2.0, 0.5, float("-inf")]]).repeat(8, 1)
    params = [SamplingParams(temperature=5e-324, top_k=top_k, top_p=top_p)] * 8
    assert sample_next(logits, params, None, [Uniforms(s) for s in range(8)]).tolist() == [1] * 8


def test_a_rows_draws_do_not_depend_on_its_batch_mates_rejections():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    mine = SamplingParams(temperature=0.9, top_p=0.8)
    others = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(), SamplingParams(temperature=2.0, top_p=0.01)]
    alone_stream, mate_stream = Uniforms(7), Uniforms(7)
    mate_streams = [Uniforms(1), None, Uniforms(2)]
    for _ in range(30):
        alone = sample_next(logits[:1], [mine], None, [alone_stream])
        together = sample_next(logits, [mine, *others], None, [mate_stream, *mate_streams])
        assert alone.item() == together[0].item()


# no_repeat_ngram ----------------------------------------------------------------------------

def ngrams(text: str, n: int) -> list[str]:
    return [text[i:i + n] for i in range(len(text) - n + 1)]


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0)])
def test_no_repeat_ngram_never_repeats_an_ngram_of_the_prefix_or_the_output(trained, n, params):
    """The trained model's greedy text is the lyric again and again; with the option, no n characters
    in a row occur twice in prefix + output."""
    prefix = "分开的夜里"
    loops = generate(trained.model, trained.vocab, prefix, 150, params, seed=3)[0].text
    assert max(Counter(ngrams(loops, n)).values()) > 1
    text = generate(trained.model, trained.vocab, prefix, 150, SamplingParams(params.temperature, no_repeat_ngram=n),
                    seed=3)[0].text
    assert len(text) == len(prefix) + 150
    assert max(Counter(ngrams(text, n)).values()) == 1


def test_no_repeat_ngram_on_a_row_leaves_its_batch_mates_alone(trained):
    rows = [(SamplingParams(no_repeat_ngram=3), None), (SamplingParams(), None),
            (SamplingParams(temperature=0.9, no_repeat_ngram=4), 11), (SamplingParams(temperature=0.9), 11)]
    alone = [generate(trained.model, trained.vocab, "不分开", 40, p, seed=s)[0].text for p, s in rows]
    together = []
    for p, s in rows:
        together.append(Generation(trained.model, trained.vocab, Request("不分开", 40, p, seed=s)))
    from model_store.batch import Batch, prefill_rows
    batch, all_rows = Batch(trained.model, trained.vocab), []
    with torch.no_grad():
        for g in together:
            rows_of_g = g.rows()
            all_rows.append(rows_of_g)
            batch.add(rows_of_g, *prefill_rows(trained.model, [g]))
        while batch.rows:
            batch.step()
    assert ["不分开" + r[0].text for r in all_rows] == alone


def test_a_structure_constraint_wins_over_no_repeat_ngram(trained):
    from model_store.constraints import Constraints
    text = generate(trained.model, trained.vocab, "分开", 12, SamplingParams(no_repeat_ngram=2),
                    constraints=Constraints(lines=4, line_lengths=[2, 2, 2, 2]))[0].generated
    assert [len(line) for line in text.split("\n")[:4]] == [2, 2, 2, 2]


def test_no_repeat_ngram_of_one_is_refused():
    with pytest.raises(ValueError, match="no_repeat_ngram"):
        SamplingParams(no_repeat_ngram=1)


def test_when_a_constraint_leaves_only_banned_characters_the_ban_steps_aside():
    from model_store.continuation import Row
    from model_store.sampling import NgramBlocker, block_repeats
    row = Row(SamplingParams(no_repeat_ngram=2), None, [], 10, read=[0, 1, 0])  # "aba": after "a", "b" is banned
    assert row.ngrams.banned() == {1}
    free = torch.tensor([[1.0, 2.0, 3.0]])
    assert block_repeats(free, [row]).tolist() == [[1.0, float("-inf"), 3.0]]
    only_b = torch.tensor([[float("-inf"), 2.0, float("-inf")]])  # a constraint allows "b" alone
    assert torch.equal(block_repeats(only_b, [row]), only_b)
    assert NgramBlocker(3, [0, 1, 2, 0, 1]).banned() == {2}
