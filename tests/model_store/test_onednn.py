"""model_store/onednn.py: the float32 products on oneDNN give what F.linear gives, gradients included."""

import pytest
import torch
import torch.nn.functional as F

from model_store import onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason="oneDNN is not available in this torch build")


@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_and_its_gradients_equal_f_linear(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    weight, b = torch.randn(24, 16, generator=g), torch.randn(24, generator=g) if bias else None
    results = []
    for product in (onednn.linear, F.linear):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, weight, b)]
        y = product(*leaves)
        (y * torch.arange(y.numel()).view(y.shape).sin()).sum().backward()  # a gradient that is not all ones
        results.append([y] + [t.grad for t in leaves if t is not None])
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_linear_takes_a_non_contiguous_input():
    x = torch.randn(5, 3, 16).transpose(0, 1)
    weight = torch.randn(8, 16)
    torch.testing.assert_close(onednn.linear(x, weight, None), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_weight_grad_is_dy_transposed_times_x():
    dy, x = torch.randn(40, 24), torch.randn(40, 16)
    torch.testing.assert_close(onednn.weight_grad(dy, x), dy.t() @ x, rtol=1e-5, atol=1e-5)


def test_bfloat16_autocast_and_other_dtypes_are_left_to_torch():
    x, weight = torch.randn(4, 16), torch.randn(8, 16)
    assert onednn.applies(x, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not onednn.applies(x, weight)
        assert onednn.linear(x, weight, None).dtype == torch.bfloat16
    assert not onednn.applies(x.double(), weight.double())
    assert onednn.linear(x.double(), weight.double(), None).dtype == torch.float64


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_a_training_step_on_onednn_matches_one_on_f_linear(make_model, monkeypatch, cell):
    # the whole model (one-hot lookup, recurrence with its hand-written backward, dense layer) both ways
    inputs = torch.randint(0, 12, (4, 9), generator=torch.Generator().manual_seed(1))
    grads = []
    for enabled in (True, False):
        monkeypatch.setattr(onednn, "ENABLED", enabled)
        model = make_model(cell, num_layers=2, embed_size=8).train()
        model.impl = "scratch"
        logits, _ = model(inputs)
        F.cross_entropy(logits.reshape(-1, 12), inputs.roll(-1, 1).reshape(-1)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)
