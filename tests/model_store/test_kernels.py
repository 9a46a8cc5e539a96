"""The fused C kernels (model_store/kernels.c), built at install into one module per vector width:
each build the CPU runs computes the same equations as cells.py and torch, and without a build the
cells fall back to torch ops, logged."""

import importlib
import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from model_store import cells, kernels, onednn


def runnable_builds() -> list[str]:
    """The builds setup.py made here that this CPU runs."""
    try:
        level = importlib.import_module("model_store._kernels_baseline").cpu_level()
    except ImportError:
        return []
    names = []
    for name, needed in kernels.BUILDS:
        try:
            importlib.import_module(f"model_store._kernels_{name}")
        except ImportError:
            continue
        if level >= needed:
            names.append(name)
    return names


@pytest.fixture(params=runnable_builds() or ["none"])
def built(request, monkeypatch):
    """Each build of the kernels this CPU runs, in turn, as the one kernels.py uses."""
    if request.param == "none":
        if os.environ.get("CI"):
            pytest.fail("the C kernels were not built at install: CI must test them (.ci/run installs gcc)")
        pytest.skip("the C kernels were not built at install (no C compiler?)")
    monkeypatch.setattr(kernels, "_library", importlib.import_module(f"model_store._kernels_{request.param}"))
    monkeypatch.setattr(kernels, "ENABLED", True)
    return request.param


def test_the_widest_build_the_cpu_runs_is_the_one_loaded():
    builds = runnable_builds()
    if not builds:
        pytest.skip("the C kernels were not built at install")
    assert kernels.load().__name__ == f"model_store._kernels_{builds[0]}"
    if importlib.import_module("model_store._kernels_baseline").cpu_level() >= 3:
        assert builds[0] != "baseline"  # setup.py builds the wider x86-64 levels


def test_without_a_build_the_cells_run_as_torch_ops_and_say_so(monkeypatch, make_model, caplog):
    monkeypatch.setitem(sys.modules, "model_store._kernels_baseline", None)  # as if the build had failed
    with caplog.at_level(logging.WARNING, logger="model_store.kernels"):
        assert kernels.load() is None
    assert "not built" in caplog.text and "torch ops" in caplog.text
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setattr(kernels, "ENABLED", False)
    assert not kernels.applies(torch.zeros(1))
    inputs = torch.randint(0, 12, (3, 8), generator=torch.Generator().manual_seed(1))
    model = make_model("gru", num_layers=2, embed_size=0).train()
    logits, _ = model(inputs)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lyrics_kernels_0_switches_them_off(monkeypatch, caplog):
    monkeypatch.setenv("LYRICS_KERNELS", "0")
    with caplog.at_level(logging.INFO, logger="model_store.kernels"):
        assert kernels.load() is None
    assert "LYRICS_KERNELS=0" in caplog.text


def test_a_binding_refuses_the_wrong_arguments_instead_of_reading_memory(built):
    with pytest.raises(TypeError):
        kernels.library().argmax_rows(1, 4, 0)  # one argument short
    with pytest.raises(TypeError):
        kernels.library().argmax_rows(1, 4, "not an address", None)


def test_loading_the_kernels_leaves_subnormal_floats_alone(built):
    # linking with -ffast-math would switch the whole process to flush-to-zero
    assert torch.tensor(1e-40).item() != 0.0
    assert (torch.tensor([1e-38]) / 100).item() != 0.0


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_a_layer_forward_equals_the_torch_cell_equations(built, cell):
    g = torch.Generator().manual_seed(0)
    gates, steps, batch, n = {"rnn": 1, "gru": 3, "lstm": 4}[cell], 6, 5, 19  # 19: vector body and scalar tail
    xg = torch.randn(steps, batch, gates * n, generator=g)
    h0, c0 = torch.randn(batch, n, generator=g), torch.randn(batch, n, generator=g) if cell == "lstm" else None
    w_hh, b_hh = torch.randn(gates * n, n, generator=g) * 0.3, torch.randn(gates * n, generator=g)
    with torch.no_grad():
        hs, c_last = cells.recurrence(cell, xg, h0, c0, w_hh, b_hh)
        step = cells.CELLS[cell][0]
        H, C = h0, c0
        for t in range(steps):
            H, C, _ = step(xg[t], H @ w_hh.T + b_hh, H, C)
            torch.testing.assert_close(hs[t], H, rtol=1e-5, atol=1e-6)
        if cell == "lstm":
            torch.testing.assert_close(c_last, C, rtol=1e-5, atol=1e-6)


def test_kernels_apply_to_float32_on_a_cpu_only(built):
    x = torch.zeros(2, 3)
    assert kernels.applies(x)
    assert not kernels.applies(x.double()) and not kernels.applies(x.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the matmuls in bfloat16, the step arithmetic in float32
        assert kernels.applies(x)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_equals_torchs_loss_and_gradient(built, eps):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 53, generator=g) * 3).requires_grad_()
    targets = torch.randint(0, 53, (37,), generator=g)
    log_probs = torch.log_softmax(logits, -1)
    nll_ref = torch.nn.functional.nll_loss(log_probs, targets)
    loss_ref = (1 - eps) * nll_ref - eps * log_probs.mean()
    (2.5 * loss_ref).backward()  # a gradient other than 1 reaching the loss
    grad_ref, logits.grad = logits.grad, None
    loss, nll = kernels.cross_entropy(logits, targets, eps)
    (2.5 * loss).backward()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(nll, nll_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad, grad_ref, rtol=1e-5, atol=1e-7)
    assert not nll.requires_grad


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_a_training_step_with_the_kernels_matches_one_with_torch_ops(built, make_model, monkeypatch, cell, bf16):
    # the model's recurrence and the loss, forward and backward, both ways
    inputs = torch.randint(0, 12, (4, 9), generator=torch.Generator().manual_seed(1))
    grads, losses = [], []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        model = make_model(cell, num_layers=2, embed_size=0).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits, _ = model(inputs)
        assert logits.dtype == (torch.bfloat16 if bf16 else torch.float32)
        loss, _ = kernels.cross_entropy(logits.reshape(-1, 12), inputs.roll(-1, 1).reshape(-1), 0.1)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    # bfloat16 products: the two ways round differently, so only to bfloat16's precision; in float32 the
    # kernels' own products sum in another order than oneDNN's (differences ~1e-5 of the largest gradient)
    rtol, atol = (2e-2, 2e-3) if bf16 else (1e-4, 1e-5)
    torch.testing.assert_close(losses[0], losses[1], rtol=rtol, atol=atol)
    for name in grads[0]:
        assert grads[0][name].dtype == torch.float32
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("vocab", [1, 7, 64, 65, 200])
def test_argmax_equals_torchs_with_ties_and_masked_logits(built, vocab):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randint(-3, 3, (50, vocab), generator=g).float()  # many ties: the first one wins
    logits[0] = -float("inf")  # everything masked
    logits[1, vocab // 2:] = -float("inf")
    logits[2, -1] = 9.0  # the maximum in the last, partial block
    assert torch.equal(kernels.argmax(logits), logits.argmax(dim=1))
    assert torch.equal(kernels.argmax(logits[:0]), logits[:0].argmax(dim=1))


class AlmostOne:
    """A uniform stream stuck just below 1 (it rounds to 1 in float32)."""

    def next(self) -> float:
        return 1 - 2 ** -60


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_the_c_sampler_never_picks_a_masked_character(built, top_p):
    from model_store.sampling import SamplingParams, sample_next

    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(0))
    logits[:, 150:] = -float("inf")  # the last drawable character is 149
    params = [SamplingParams(temperature=0.7, top_p=top_p)] * 5
    picks = sample_next(logits, params, None, [AlmostOne()] * 5)
    assert bool((picks < 150).all()), picks


def test_a_sampled_row_is_the_same_in_any_batch(built):
    from model_store.sampling import SamplingParams, Uniforms, sample_next

    logits = torch.randn(9, 500, generator=torch.Generator().manual_seed(1)) * 3
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=40 * (i % 2))
              if i % 3 else SamplingParams() for i in range(9)]  # greedy rows mixed in
    whole = sample_next(logits, params, None, [Uniforms(i) for i in range(9)])
    for i in range(9):
        alone = sample_next(logits[i:i + 1], params[i:i + 1], None, [Uniforms(i)])
        assert int(alone) == int(whole[i])


def test_marking_seen_characters_equals_torchs_scatter(built):
    g = torch.Generator().manual_seed(0)
    seen = torch.rand(9, 70, generator=g) < 0.3
    ids = torch.randint(0, 70, (9,), generator=g)
    expected = seen.clone().scatter_(1, ids[:, None], True)
    kernels.mark_seen(seen, ids)
    assert torch.equal(seen, expected)
    with pytest.raises(IndexError, match="outside the vocabulary"):
        kernels.mark_seen(seen, torch.tensor([0] * 8 + [70]))
    assert torch.equal(seen, expected)  # nothing marked


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_a_generation_step_refuses_a_character_outside_the_vocabulary(built, make_model, cell):
    model = make_model(cell, vocab_size=12)
    assert model.pack()
    state = model.init_state(3)
    with torch.no_grad():
        assert model.fast_step(torch.device("cpu"))  # the packed one-step path, which reads the input table
        for bad in (12, -1):
            with pytest.raises(IndexError, match="outside the vocabulary"):
                model.step(torch.tensor([0, bad, 5]), state)
        logits, _ = model.step(torch.tensor([0, 11, 5]), state)
    assert logits.shape == (3, 12)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_one_hot_input_gates_equal_torchs_lookup_and_its_gradients(built, make_model, monkeypatch, cell):
    inputs = torch.randint(0, 9, (5, 7), generator=torch.Generator().manual_seed(2))  # 9..12 never read
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(kernels, "ENABLED", enabled)
        model = make_model(cell, vocab_size=13, hidden_size=19, embed_size=0)  # 19: not a multiple of 16
        gates = model.input_gates(inputs)
        weights = torch.randn(gates.shape, generator=torch.Generator().manual_seed(3))
        (gates * weights).sum().backward()
        results.append((gates.detach(), model.rnn.weight_ih_l0.grad, model.rnn.bias_ih_l0.grad))
    (gates, d_weight, d_bias), (ref_gates, ref_d_weight, ref_d_bias) = results
    assert torch.equal(gates, ref_gates)
    assert gates.transpose(0, 1).is_contiguous()  # time-major, as the recurrence reads it
    assert torch.equal(d_weight, ref_d_weight)  # positions summed in the same order
    assert not d_weight[:, 9:].any()
    torch.testing.assert_close(d_bias, ref_d_bias, rtol=1e-5, atol=1e-6)


def test_one_hot_input_gates_refuse_a_character_outside_the_vocabulary(built):
    weight, bias = torch.randn(6, 4), torch.randn(6)
    for bad in (4, -1):
        with pytest.raises(IndexError, match="outside the vocabulary"):
            kernels.onehot_gates(weight, bias, torch.tensor([[0, 1], [bad, 3]]))


def test_the_loss_and_the_input_gates_do_not_depend_on_the_thread_count(built):
    g = torch.Generator().manual_seed(4)
    logits, targets = torch.randn(300, 70, generator=g), torch.randint(0, 70, (300,), generator=g)
    weight, ids = torch.randn(200, 70, generator=g).requires_grad_(), torch.randint(0, 70, (30, 11), generator=g)
    bias = torch.zeros(200, requires_grad=True)
    upstream = torch.randn(11, 30, 200, generator=g)
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x = logits.clone().requires_grad_()
            loss, nll = kernels.cross_entropy(x, targets, 0.1)
            loss.backward()
            gates = kernels.onehot_gates(weight, bias, ids)
            d_weight, d_bias = torch.autograd.grad((gates * upstream).sum(), [weight, bias])
            results.append([loss, nll, x.grad, gates, d_weight, d_bias])
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        assert torch.equal(one, two)


def test_the_kernels_run_on_torchs_own_openmp_runtime(built):
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc")
    assert kernels.library().openmp()  # built with OpenMP, not serial
    loaded = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
    assert len(loaded) == 1  # not a second runtime with a second pool of threads


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("steps, rows", [(1, 3), (7, 11)])  # 11 rows: a full tile of 8 and a partial one
def test_the_recurrence_in_one_call_equals_the_step_by_step_loop(built, cell, steps, rows):
    # kernels.c's own products (recurrence_forward/backward) against oneDNN's, called step by step
    g = torch.Generator().manual_seed(5)
    n = 19  # not a multiple of the 32-column panels
    width = kernels.GATES[cell] * n
    xg, h0 = torch.randn(steps, rows, width, generator=g), torch.randn(rows, n, generator=g)
    c0 = torch.randn(rows, n, generator=g) if cell == "lstm" else None
    w_hh, b_hh = torch.randn(width, n, generator=g) * 0.3, torch.randn(width, generator=g)
    d_hs, d_c_last = torch.randn(steps, rows, n, generator=g), torch.randn(rows, n, generator=g)
    d_c_last = d_c_last if cell == "lstm" else None
    with torch.no_grad():
        ours = kernels.recurrence_forward(cell, xg, h0, c0, w_hh, b_hh, keep=True)
        loop = kernels.forward(cell, xg, h0, c0, onednn.fixed(w_hh, b_hh), keep=True)
        for a, b in zip(ours, loop, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        ours = kernels.recurrence_backward(cell, d_hs, d_c_last, h0, c0, *loop, w_hh)
        loop = kernels.backward(cell, d_hs, d_c_last, h0, c0, *loop, onednn.fixed(w_hh.t(), None))
        for a, b in zip(ours, loop, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_the_sampler_does_not_depend_on_the_thread_count(built):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(40, 300, generator=g) * 3
    uniforms = torch.rand(40, generator=g, dtype=torch.float64).tolist()
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            sampler = kernels.Sampler(logits, [0.8] * 40, [300] * 20 + [3] * 20, [0.9] * 40)
            ok = sampler.round(list(range(40)), uniforms)
            results.append((sampler.picks.clone(), ok, sampler.weights.copy()))
    finally:
        torch.set_num_threads(threads)
    (picks1, ok1, weights1), (picks2, ok2, weights2) = results
    assert torch.equal(picks1, picks2) and ok1 == ok2 and (weights1 == weights2).all()
    assert not all(ok1)  # top_k 3 rejects some draws: the survivor check ran too


def test_the_recurrence_in_one_call_does_not_depend_on_the_thread_count(built):
    g = torch.Generator().manual_seed(6)
    xg, d_hs = torch.randn(9, 20, 4 * 40, generator=g), torch.randn(9, 20, 40, generator=g)
    h0, c0 = torch.randn(20, 40, generator=g), torch.randn(20, 40, generator=g)
    w_hh, b_hh = torch.randn(160, 40, generator=g) * 0.2, torch.randn(160, generator=g)
    threads, results = torch.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            forward = kernels.recurrence_forward("lstm", xg, h0, c0, w_hh, b_hh, keep=True)
            backward = kernels.recurrence_backward("lstm", d_hs, None, h0, c0, *forward, w_hh)
            results.append([*forward, *backward])
    finally:
        torch.set_num_threads(threads)
    for first, *others in zip(*results, strict=True):
        assert all(torch.equal(first, other) for other in others)
