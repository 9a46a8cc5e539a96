import itertools

import pytest
import torch
import torch.nn.functional as F

from model_store import kernels
from model_store.model import CharLM, ModelConfig
from model_store.vocab import one_hot

V = 12


def random_inputs(batch=3, steps=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (batch, steps), generator=g)


def random_state(model: CharLM, batch: int, seed=2):
    g = torch.Generator().manual_seed(seed)
    c = model.config
    shape = (c.num_layers, batch, c.hidden_size)
    h = torch.randn(shape, generator=g) * 0.5
    if c.cell == "lstm":
        return h, torch.randn(shape, generator=g) * 0.5
    return h


def states(state):
    return list(state) if isinstance(state, tuple) else [state]


@pytest.fixture(params=["C kernels", "torch ops"])
def steps_by(request, monkeypatch):
    """Runs a test with the scratch cells' step arithmetic in the C kernels and as torch ops."""
    if request.param == "C kernels" and kernels.library() is None:
        pytest.skip("the C kernels could not be built here (no C compiler?)")
    monkeypatch.setattr(kernels, "ENABLED", request.param == "C kernels")
    return request.param


# Input step -------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_one_hot_input_step_is_one_hot_times_w_xh_plus_bias(make_model, cell):
    model = make_model(cell, vocab_size=V, hidden_size=8, embed_size=0)
    x = random_inputs()
    w_xh = model.rnn.weight_ih_l0.T  # (V, gates * hidden): W_xh as the tutorial writes it
    assert w_xh.shape == (V, {"rnn": 1, "gru": 3, "lstm": 4}[cell] * 8)
    expected = torch.stack([one_hot(row, V) @ w_xh + model.rnn.bias_ih_l0 for row in x])
    got = model.input_gates(x)
    assert got.shape == expected.shape == (3, 7, w_xh.shape[1])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_embedded_input_step_is_embedding_then_linear(make_model, cell):
    model = make_model(cell, vocab_size=V, hidden_size=8, embed_size=5)
    x = random_inputs()
    emb = model.embedding.weight[x]  # (batch, steps, embed)
    expected = emb @ model.rnn.weight_ih_l0.T + model.rnn.bias_ih_l0
    torch.testing.assert_close(model.input_gates(x), expected, atol=1e-6, rtol=0)


def test_one_hot_model_has_no_embedding_and_takes_vocab_wide_input(make_model):
    model = make_model("gru", vocab_size=V, embed_size=0)
    assert model.embedding is None
    assert model.rnn.weight_ih_l0.shape == (3 * 16, V)
    assert model.impl == "scratch"  # auto
    assert make_model("gru", vocab_size=V, embed_size=4).impl == "fused"  # auto


# scratch == fused ---------------------------------------------------------------------------

CASES = list(itertools.product(["rnn", "gru", "lstm"], [1, 2, 3]))


@pytest.mark.parametrize("cell,num_layers", CASES)
@pytest.mark.parametrize("initial", ["zero", "random"])
def test_scratch_and_fused_give_the_same_logits_and_final_state(make_model, cell, num_layers, initial, steps_by):
    model = make_model(cell, vocab_size=V, hidden_size=10, num_layers=num_layers, embed_size=6, dropout=0.3,
                       std=0.4, seed=num_layers)
    x = random_inputs(batch=3, steps=9)
    state = random_state(model, 3) if initial == "random" else None
    model.impl = "fused"
    fused_logits, fused_state = model(x, state)
    model.impl = "scratch"
    scratch_logits, scratch_state = model(x, state)
    assert fused_logits.shape == scratch_logits.shape == (3, 9, V)
    torch.testing.assert_close(scratch_logits, fused_logits, atol=1e-5, rtol=0)
    assert isinstance(fused_state, tuple) == isinstance(scratch_state, tuple) == (cell == "lstm")
    for s, f in zip(states(scratch_state), states(fused_state), strict=True):
        assert s.shape == f.shape == (num_layers, 3, 10)
        torch.testing.assert_close(s, f, atol=1e-5, rtol=0)


def test_a_non_zero_initial_state_changes_the_output(make_model):
    """Guards the test above: a random initial state must actually matter."""
    model = make_model("lstm", vocab_size=V, hidden_size=10, num_layers=2, embed_size=6, std=0.4)
    x = random_inputs()
    zero_logits, _ = model(x)
    state_logits, _ = model(x, random_state(model, 3))
    assert not torch.allclose(zero_logits, state_logits, atol=1e-3)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_state_carried_across_calls_equals_one_call(make_model, cell, steps_by):
    model = make_model(cell, vocab_size=V, hidden_size=10, num_layers=2, embed_size=0, std=0.4)
    x = random_inputs(steps=10)
    whole, whole_state = model(x)
    first, state = model(x[:, :4])
    second, split_state = model(x[:, 4:], state)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-5, rtol=0)
    for a, b in zip(states(split_state), states(whole_state), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell,num_layers", [(c, n) for c in ("rnn", "gru", "lstm") for n in (1, 3)])
def test_scratch_backpropagation_through_time_equals_autograd_through_torch_nn(make_model, cell, num_layers, steps_by):
    """scratch's hand-written backward (cells.py) against autograd through torch.nn's modules,
    with gradient flowing from the logits, from the final state and into the initial state."""
    model = make_model(cell, vocab_size=V, hidden_size=8, num_layers=num_layers, embed_size=5, std=0.4)
    x, y = random_inputs(seed=3), random_inputs(seed=4)
    initial = random_state(model, 3)
    torch.manual_seed(5)
    final_weights = [torch.randn_like(s) for s in states(initial)]
    grads = {}
    for impl in ("fused", "scratch"):
        model.impl = impl
        model.zero_grad()
        state = tuple(s.clone().requires_grad_() for s in states(initial))
        logits, final = model(x, state if cell == "lstm" else state[0])
        loss = F.cross_entropy(logits.reshape(-1, V), y.reshape(-1))
        loss = loss + sum((f * w).sum() for f, w in zip(states(final), final_weights, strict=True))
        loss.backward()
        grads[impl] = [p.grad.clone() for p in model.parameters()] + [s.grad.clone() for s in state]
    assert len(grads["scratch"]) == len(grads["fused"])
    for s, f in zip(grads["scratch"], grads["fused"], strict=True):
        torch.testing.assert_close(s, f, atol=1e-5, rtol=1e-4)


def test_fused_without_an_embedding_is_rejected():
    config = ModelConfig(cell="gru", vocab_size=V, hidden_size=8, embed_size=0)
    with pytest.raises(ValueError, match="embed"):
        CharLM(config, impl="fused")
    model = CharLM(config, impl="scratch")
    with pytest.raises(ValueError, match="embed"):
        model.impl = "fused"
    assert model.impl == "scratch"


def test_an_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl"):
        CharLM(ModelConfig(cell="rnn", vocab_size=V, hidden_size=8), impl="cudnn")


# Dropout ------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["scratch", "fused"])
def test_dropout_between_layers_is_active_in_train_mode_and_off_in_eval_mode(make_model, impl):
    model = make_model("gru", vocab_size=V, hidden_size=16, num_layers=2, embed_size=6, dropout=0.5, impl=impl)
    x = random_inputs()
    model.train()
    torch.manual_seed(0)
    a, _ = model(x)
    b, _ = model(x)
    assert not torch.allclose(a, b, atol=1e-4)

    model.eval()
    c, _ = model(x)
    d, _ = model(x)
    assert torch.equal(c, d)
    # in eval mode the model is exactly the same model without dropout
    plain = CharLM(ModelConfig(cell="gru", vocab_size=V, hidden_size=16, num_layers=2, embed_size=6), impl=impl)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    torch.testing.assert_close(plain(x)[0], c, atol=1e-6, rtol=0)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_dropout_zeroes_a_share_p_and_scales_the_rest_like_torchs(p):
    from model_store.model import dropout

    torch.manual_seed(0)
    x = torch.rand(400, 500) + 0.5
    x.requires_grad_(True)
    y = dropout(x, p)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - p) < 0.01  # 200,000 draws: the share is within 0.003 of p
    torch.testing.assert_close(y[kept], x[kept] / (1 - p))
    y.sum().backward()
    # the gradient flows through the survivors only, with the same scale
    torch.testing.assert_close(x.grad, kept.float() / (1 - p))


# Config --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    dict(cell="transformer"),
    dict(vocab_size=0),
    dict(hidden_size=-1),
    dict(num_layers=0),
    dict(hidden_size=2.5),
    dict(embed_size=-3),
    dict(dropout=1.0),
    dict(dropout=-0.1),
])
def test_model_config_rejects_invalid_values(bad):
    kwargs = dict(cell="rnn", vocab_size=5, hidden_size=4) | bad
    with pytest.raises(ValueError):
        ModelConfig(**kwargs)


def test_model_config_round_trips_through_a_dict():
    config = ModelConfig(cell="lstm", vocab_size=7, hidden_size=9, num_layers=2, embed_size=3, dropout=0.25)
    assert ModelConfig(**config.to_dict()) == config
    assert config.to_dict() == {"cell": "lstm", "vocab_size": 7, "hidden_size": 9, "num_layers": 2,
                                "embed_size": 3, "dropout": 0.25, "weight_drop": 0.0, "tie_weights": False}


def test_a_config_without_the_newer_fields_still_loads_with_their_defaults():
    """Checkpoints written before weight_drop and tie_weights existed name neither."""
    config = ModelConfig(**{"cell": "gru", "vocab_size": 7, "hidden_size": 9, "num_layers": 1, "embed_size": 0,
                            "dropout": 0.0})
    assert config.weight_drop == 0.0 and config.tie_weights is False


def test_tied_weights_share_one_tensor_stored_once(tmp_path):
    from model_store.checkpoint import load_checkpoint, save_checkpoint
    from model_store.vocab import Vocabulary

    model = CharLM(ModelConfig(cell="lstm", vocab_size=6, hidden_size=4, embed_size=4, tie_weights=True))
    assert model.dense.weight is model.embedding.weight
    assert "dense.weight" not in model.weight_tensors()
    save_checkpoint(tmp_path / "tied.safetensors", model, Vocabulary("abcdef"))
    loaded = load_checkpoint(tmp_path / "tied.safetensors").model
    assert loaded.dense.weight is loaded.embedding.weight
    assert torch.equal(loaded.dense.weight, model.embedding.weight)
    with pytest.raises(ValueError, match="embed_size == hidden_size"):
        ModelConfig(cell="gru", vocab_size=6, hidden_size=4, embed_size=3, tie_weights=True)


def test_weight_drop_masks_the_recurrent_weights_only_while_training():
    torch.manual_seed(0)
    model = CharLM(ModelConfig(cell="gru", vocab_size=6, hidden_size=8, embed_size=4, weight_drop=0.5))
    x = torch.tensor([[0, 1, 2, 3, 4, 5]])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
    plain = CharLM(ModelConfig(cell="gru", vocab_size=6, hidden_size=8, embed_size=4)).eval()
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(model(x)[0], plain(x)[0], atol=1e-6)
    model.train()
    assert not torch.equal(model(x)[0], model(x)[0])


@pytest.mark.parametrize("cell,gates", [("rnn", 1), ("gru", 3), ("lstm", 4)])
def test_weights_use_torch_nn_names_and_shapes(cell, gates):
    model = CharLM(ModelConfig(cell=cell, vocab_size=V, hidden_size=8, num_layers=2, embed_size=5))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {
        "embedding.weight": (V, 5),
        "rnn.weight_ih_l0": (gates * 8, 5), "rnn.weight_hh_l0": (gates * 8, 8),
        "rnn.bias_ih_l0": (gates * 8,), "rnn.bias_hh_l0": (gates * 8,),
        "rnn.weight_ih_l1": (gates * 8, 8), "rnn.weight_hh_l1": (gates * 8, 8),
        "rnn.bias_ih_l1": (gates * 8,), "rnn.bias_hh_l1": (gates * 8,),
        "dense.weight": (V, 8), "dense.bias": (V,),
    }
    assert model.num_parameters() == sum(v.numel() for v in model.state_dict().values())


# oneDNN-packed weights (model_store/packed.py) ----------------------------------------------

PACK_CASES = [("rnn", 1, 0), ("gru", 1, 0), ("lstm", 1, 0), ("gru", 2, 8), ("lstm", 2, 8), ("rnn", 3, 16)]


def packed_copy(make_model, cell, num_layers, embed_size):
    plain = make_model(cell, num_layers=num_layers, embed_size=embed_size, std=0.3)
    packed = make_model(cell, num_layers=num_layers, embed_size=embed_size, std=0.3)
    if not packed.pack():
        pytest.skip("oneDNN is not available in this torch build")
    return plain, packed


@pytest.mark.parametrize("cell,num_layers,embed_size", PACK_CASES)
def test_packed_weights_give_the_same_logits_and_state_within_float32_rounding(make_model, cell, num_layers,
                                                                                 embed_size):
    plain, packed = packed_copy(make_model, cell, num_layers, embed_size)
    inputs = random_inputs(batch=20, steps=5)
    with torch.no_grad():
        for a, b in zip(plain(inputs, random_state(plain, 20)), packed(inputs, random_state(packed, 20)), strict=True):
            for x, y in zip(states(a), states(b), strict=True):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell,num_layers,embed_size", PACK_CASES)
def test_with_packed_weights_a_rows_result_does_not_depend_on_its_batch(make_model, cell, num_layers, embed_size, steps_by):
    # bit for bit: what lets a request served in a batch of any size get exactly what it gets alone
    _, packed = packed_copy(make_model, cell, num_layers, embed_size)
    inputs, state = random_inputs(batch=40, steps=3), random_state(packed, 40)
    with torch.no_grad():
        whole_logits, whole_state = packed(inputs, state)
        for batch in (1, 2, 7, 33):
            part = tuple(s[:, :batch] for s in states(state))
            logits, new_state = packed(inputs[:batch], part if cell == "lstm" else part[0])
            assert torch.equal(logits, whole_logits[:batch])
            assert all(torch.equal(a, b[:, :batch]) for a, b in zip(states(new_state), states(whole_state), strict=True))


def test_packed_weights_are_not_used_when_a_gradient_is_wanted(make_model):
    plain, packed = packed_copy(make_model, "gru", 2, 8)
    plain.train(), packed.train()
    inputs = random_inputs()
    torch.testing.assert_close(packed(inputs)[0], plain(inputs)[0], rtol=0, atol=0)  # the very same arithmetic
    packed(inputs)[0].sum().backward()
    assert all(p.grad is not None for p in packed.parameters())


def test_a_weight_changed_after_packing_is_packed_again(make_model):
    plain, packed = packed_copy(make_model, "lstm", 1, 8)
    inputs = random_inputs()
    with torch.no_grad():
        before = packed(inputs)[0]
        for model in (plain, packed):  # an optimizer step or a load_state_dict changes weights in place
            model.dense.weight.mul_(2.0)
            model.rnn.weight_hh_l0.add_(0.1)
        after = packed(inputs)[0]
        assert not torch.allclose(before, after)
        torch.testing.assert_close(after, plain(inputs)[0], rtol=1e-5, atol=1e-5)


def two_layer_model(make_model, cell: str, packed: bool) -> CharLM:
    model = make_model(cell, num_layers=2, embed_size=0).eval()
    if packed and not model.pack():
        pytest.skip("oneDNN is not available in this torch build")
    return model


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("packed", [False, True])
def test_last_only_gives_the_last_steps_logits_and_the_same_state(make_model, cell, packed):
    # what a prefill asks for: no output layer for the positions before the last
    model = two_layer_model(make_model, cell, packed)
    inputs = random_inputs(batch=3, steps=6)
    with torch.no_grad():
        whole, whole_state = model(inputs)
        last, last_state = model(inputs, last_only=True)
    assert last.shape == (3, 1, 12)
    torch.testing.assert_close(last[:, 0], whole[:, -1], rtol=0, atol=0 if packed else 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(states(last_state), states(whole_state), strict=True))


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("packed", [False, True])
def test_two_steps_equal_one_two_position_forward(make_model, cell, packed):
    # packed: `step` takes the one-step path, the two-position call (every position's logits) the
    # general one; bit for bit the same
    model = two_layer_model(make_model, cell, packed)
    inputs, state = random_inputs(batch=4, steps=2), random_state(model, 4)
    with torch.no_grad():
        _, middle = model.step(inputs[:, 0], state)
        logits, new_state = model.step(inputs[:, 1], middle)
        ref_logits, ref_state = model(inputs, state)
    assert logits.shape == (4, 12)
    tolerance = {"rtol": 0, "atol": 0} if packed else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(logits, ref_logits[:, -1], **tolerance)
    for a, b in zip(states(new_state), states(ref_state), strict=True):
        torch.testing.assert_close(a, b, **tolerance)


def test_cudnn_rnns_compute_float32_in_full_precision():
    # cuDNN's TensorFloat-32 moved the bundled models' logits by 1e-3 against the CPU on an H100
    # (scripts/gpu_check.py); model_store turns it off when imported.
    assert torch.backends.cudnn.allow_tf32 is False
