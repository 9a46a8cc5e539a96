import hashlib
import json
import math
import random
from dataclasses import replace
from datetime import datetime

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model_store.checkpoint import load_checkpoint, read_metadata
from model_store.model import CharLM, ModelConfig
from training.corpus import CorpusError, load_corpus
from training.train import clip_gradients, evaluate, flat_positions, paths_for, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(cfg):
    logs: list[str] = []
    return train(cfg, log=logs.append), logs


def model_tensors(path):
    return {k.removeprefix("model."): v for k, v in load_file(path).items() if k.startswith("model.")}


# Gradient clipping --------------------------------------------------------------------------


def tutorial_grad_clipping(params, theta, device="cpu"):
    """d2l's grad_clipping, verbatim in substance."""
    norm = torch.tensor([0.0], device=device)
    for param in params:
        norm += (param.grad.data ** 2).sum()
    norm = norm.sqrt().item()
    if norm > theta:
        for param in params:
            param.grad.data *= theta / norm


def model_with_gradients(seed=0) -> CharLM:
    torch.manual_seed(seed)
    model = CharLM(ModelConfig(cell="gru", vocab_size=10, hidden_size=8, embed_size=4))
    x = torch.randint(0, 10, (4, 6))
    logits, _ = model(x)
    (F.cross_entropy(logits.reshape(-1, 10), x.roll(-1, 1).reshape(-1)) * 100).backward()
    return model


def global_norm(params) -> float:
    return math.sqrt(sum(float((p.grad ** 2).sum()) for p in params))


@pytest.mark.parametrize("theta", [0.01, 0.5, 2.0])
def test_clip_gradients_scales_the_global_norm_down_to_theta_and_returns_the_norm_before(theta):
    model = model_with_gradients()
    params = list(model.parameters())
    before = global_norm(params)
    grads_before = [p.grad.clone() for p in params]
    assert before > theta
    returned = clip_gradients(params, theta)
    assert returned == pytest.approx(before, rel=1e-5)
    assert global_norm(params) <= theta * (1 + 1e-5)
    assert global_norm(params) == pytest.approx(theta, rel=1e-4)
    # one common factor: directions are kept
    factor = theta / before
    for p, g in zip(params, grads_before, strict=True):
        torch.testing.assert_close(p.grad, g * factor, atol=1e-7, rtol=1e-4)


def test_clip_gradients_leaves_small_gradients_alone_and_theta_0_means_off():
    model = model_with_gradients()
    params = list(model.parameters())
    before = [p.grad.clone() for p in params]
    norm = global_norm(params)
    assert clip_gradients(params, norm * 10) == pytest.approx(norm, rel=1e-5)
    assert clip_gradients(params, 0) == pytest.approx(norm, rel=1e-5)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before, strict=True))


def test_the_tutorials_clipping_of_a_one_shot_generator_never_clips_while_ours_does():
    theta = 0.01
    # the tutorial passed model.parameters(), a generator its norm loop used up
    model = model_with_gradients()
    before = global_norm(model.parameters())
    assert before > theta
    tutorial_grad_clipping(model.parameters(), theta)
    assert global_norm(model.parameters()) == pytest.approx(before, rel=1e-6)  # unclipped

    # the same function given a list does clip: the generator is the bug
    model = model_with_gradients()
    tutorial_grad_clipping(list(model.parameters()), theta)
    assert global_norm(model.parameters()) == pytest.approx(theta, rel=1e-4)

    # ours clips whatever it is given
    model = model_with_gradients()
    clip_gradients(model.parameters(), theta)
    assert global_norm(model.parameters()) == pytest.approx(theta, rel=1e-4)


# A training run ---------------------------------------------------------------------------


def test_training_reduces_the_train_perplexity(trained):
    history = trained.result.history
    assert len(history) == trained.cfg.epochs
    first, last = history[0]["train_perplexity"], history[-1]["train_perplexity"]
    assert last < first / 5
    assert last < 2.0  # the periodic corpus is nearly learnt
    assert trained.result.final_train_perplexity == last
    assert trained.result.epochs_run == trained.cfg.epochs


@pytest.mark.parametrize("cell,embed", [("rnn", 0), ("gru", 8)])
def test_bf16_mixed_precision_learns_like_fp32_and_keeps_float32_weights(tmp_path, session_corpus_file,
                                                                         tiny_train_config, cell, embed):
    ppl = {}
    for precision in ("fp32", "bf16"):
        cfg = tiny_train_config(session_corpus_file, tmp_path / f"{precision}.safetensors", cell=cell, embed_size=embed,
                                hidden_size=32, num_steps=10, batch_size=8, epochs=6, lr=0.02, precision=precision)
        result, _ = run(cfg)
        ppl[precision] = result.final_train_perplexity
        checkpoint = load_checkpoint(cfg.out)
        assert all(p.dtype == torch.float32 for p in checkpoint.model.parameters())
        assert checkpoint.training["options"]["precision"] == precision
    assert ppl["bf16"] < ppl["fp32"] * 1.15 + 0.05
    assert ppl["bf16"] < 3.0  # it learnt the periodic corpus, not merely matched a bad run


def test_init_std_draws_the_tutorials_normal_weights_and_zero_biases(corpus_file, tiny_train_config, tmp_path):
    from training.corpus import load_corpus
    from training.train import setup

    cfg = tiny_train_config(corpus_file, tmp_path / "m.safetensors", hidden_size=64, init_std=0.01)
    model, _, _ = setup(cfg, load_corpus(cfg.corpus), torch.device("cpu"))
    weights = torch.cat([p.flatten() for p in model.parameters() if p.dim() > 1])
    assert weights.std().item() == pytest.approx(0.01, rel=0.05)
    assert abs(weights.mean().item()) < 1e-3
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters() if p.dim() == 1)
    default, _, _ = setup(replace(cfg, init_std=0.0), load_corpus(cfg.corpus), torch.device("cpu"))
    assert any(torch.count_nonzero(p) > 0 for p in default.parameters() if p.dim() == 1)  # torch's own init


def test_single_bias_keeps_the_recurrent_biases_at_zero_and_trains_the_others(corpus_file, tiny_train_config,
                                                                              tmp_path):
    # the tutorial's cells have one bias per gate (b_h); torch's have two (b_ih + b_hh)
    cfg = tiny_train_config(corpus_file, tmp_path / "m.safetensors", cell="gru", num_layers=2, epochs=2,
                            single_bias=True, optimizer="sgd", lr=1.0)
    from training.train import setup

    initial = dict(setup(cfg, load_corpus(cfg.corpus), torch.device("cpu"))[0].named_parameters())
    run(cfg)
    tensors = load_file(cfg.out)
    for layer in (0, 1):
        assert torch.count_nonzero(tensors[f"rnn.bias_hh_l{layer}"]) == 0
        assert not torch.equal(tensors[f"rnn.bias_ih_l{layer}"], initial[f"rnn.bias_ih_l{layer}"])  # trained
    run(replace(cfg, single_bias=False))
    assert torch.count_nonzero(load_file(cfg.out)["rnn.bias_hh_l0"]) > 0


def test_metrics_have_one_json_line_per_epoch(trained):
    lines = trained.paths["metrics"].read_text().splitlines()
    assert len(lines) == trained.cfg.epochs
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == list(range(1, trained.cfg.epochs + 1))
    for r in records:
        assert set(r) >= {"epoch", "train_perplexity", "val_perplexity", "grad_norm", "chars_per_sec", "seconds"}
        assert r["train_perplexity"] > 1.0 and r["val_perplexity"] > 1.0 and r["grad_norm"] > 0
    assert records == trained.result.history


def test_the_curves_are_a_png(trained):
    data = trained.paths["curves"].read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000
    assert not list(trained.path.parent.glob(".*tmp*"))  # no temp files left behind


def test_the_training_summary_describes_the_run(trained, session_corpus_file, corpus_text):
    summary = read_metadata(trained.path)["training"]
    assert summary["corpus_sha256"] == hashlib.sha256(session_corpus_file.read_bytes()).hexdigest()
    assert summary["corpus_chars"] == len(corpus_text)
    assert summary["train_chars"] + summary["val_chars"] == len(corpus_text)
    assert summary["epochs"] == trained.result.best_epoch
    assert summary["best_epoch"] == trained.result.best_epoch
    assert summary["train_perplexity"] == pytest.approx(trained.result.history[summary["epochs"] - 1]["train_perplexity"])
    assert summary["val_perplexity"] == pytest.approx(trained.result.best_val_perplexity)
    assert summary["command"] == trained.cfg.command
    created = datetime.fromisoformat(summary["created_at"])
    assert created.tzinfo is not None
    assert summary["options"]["hidden_size"] == 32 and summary["options"]["cell"] == "rnn"
    assert summary["device"] == "cpu"
    assert summary["torch_version"] == torch.__version__


def test_the_checkpoint_holds_the_models_config_vocabulary_and_newline_policy(trained, corpus_text):
    ck = trained.checkpoint
    assert ck.config == ModelConfig(cell="rnn", vocab_size=len(set(corpus_text)), hidden_size=32)
    assert ck.vocab.idx_to_char == sorted(set(corpus_text))
    assert ck.newlines == "keep"


@pytest.fixture(scope="module")
def overfitting_run(tmp_path_factory, tiny_train_config, lyric):
    """Training text is the lyric; validation is the lyric's characters shuffled, so the
    validation perplexity gets worse as the model learns: the best epoch is not the last."""
    chars = list(lyric)
    random.Random(1).shuffle(chars)
    text = lyric * 9 + "".join(chars)
    directory = tmp_path_factory.mktemp("overfit")
    corpus = directory / "c.txt"
    corpus.write_text(text, encoding="utf-8")
    cfg = tiny_train_config(corpus, directory / "best.safetensors", epochs=4, lr=0.02, val_frac=0.1)
    result, _ = run(cfg)
    return cfg, result


def test_the_checkpoint_on_disk_is_the_best_epoch_by_validation_perplexity(overfitting_run):
    cfg, result = overfitting_run
    paths = paths_for(cfg.out)
    records = [json.loads(line) for line in paths["metrics"].read_text().splitlines()]
    vals = [r["val_perplexity"] for r in records]
    best = min(vals)
    assert result.best_epoch == vals.index(best) + 1
    assert result.best_epoch < cfg.epochs  # this run does get worse, so the test means something
    meta = read_metadata(cfg.out)["training"]
    assert meta["val_perplexity"] == best
    assert meta["best_epoch"] == result.best_epoch
    # the weights on disk really are that epoch's: they score that validation perplexity
    ck = load_checkpoint(cfg.out)
    corpus = load_corpus(cfg.corpus, cfg.newlines, cfg.val_frac, cfg.max_chars)
    assert evaluate(ck.model, corpus) == pytest.approx(best, rel=1e-5)
    # and they are not the latest weights (those are in the .resume file)
    latest = model_tensors(paths["resume"])
    assert any(not torch.equal(latest[k], v) for k, v in ck.model.state_dict().items())


def test_validation_perplexity_is_only_computed_every_eval_every_epochs_and_at_the_end(
        tmp_path, corpus_file, tiny_train_config):
    cfg = tiny_train_config(corpus_file, tmp_path / "m.safetensors", epochs=5, eval_every=2)
    result, _ = run(cfg)
    evaluated = [h["epoch"] for h in result.history if h["val_perplexity"] is not None]
    assert evaluated == [2, 4, 5]
    assert result.best_epoch in evaluated


def test_without_a_validation_split_the_last_epoch_is_saved(tmp_path, corpus_file, tiny_train_config):
    cfg = tiny_train_config(corpus_file, tmp_path / "m.safetensors", epochs=3, val_frac=0.0)
    result, _ = run(cfg)
    assert result.best_val_perplexity is None
    assert result.best_epoch == 3
    assert all(h["val_perplexity"] is None for h in result.history)
    summary = read_metadata(cfg.out)["training"]
    assert summary["val_perplexity"] is None and summary["val_chars"] == 0 and summary["epochs"] == 3
    ck = load_checkpoint(cfg.out)
    latest = model_tensors(paths_for(cfg.out)["resume"])
    assert all(torch.equal(latest[k], v) for k, v in ck.model.state_dict().items())
    assert paths_for(cfg.out)["curves"].read_bytes().startswith(PNG_MAGIC)


# Optimizers, cells, reproducibility -----------------------------------------------------------


@pytest.mark.parametrize("optimizer,lr", [("sgd", 1.0), ("adam", 0.01)])
def test_sgd_and_adam_both_train(tmp_path, corpus_file, tiny_train_config, optimizer, lr):
    cfg = tiny_train_config(corpus_file, tmp_path / "m.safetensors", optimizer=optimizer, lr=lr, epochs=3)
    result, _ = run(cfg)
    ppl = [h["train_perplexity"] for h in result.history]
    assert ppl[-1] < ppl[0]
    assert read_metadata(cfg.out)["training"]["options"]["optimizer"] == optimizer


@pytest.mark.parametrize("cell,extra", [
    ("gru", dict(embed_size=8, impl="fused")),
    ("lstm", dict(embed_size=8, impl="scratch", num_layers=2, dropout=0.2)),
])
def test_other_cells_and_implementations_train_and_save(tmp_path, corpus_file, tiny_train_config, cell, extra):
    cfg = tiny_train_config(corpus_file, tmp_path / "m.safetensors", cell=cell, epochs=2, **extra)
    result, logs = run(cfg)
    assert result.history[-1]["train_perplexity"] < result.history[0]["train_perplexity"]
    ck = load_checkpoint(cfg.out)
    assert ck.config.cell == cell and ck.config.embed_size == 8
    assert f"impl {extra['impl']}" in logs[0]


def test_seeded_cpu_runs_are_reproducible(tmp_path, corpus_file, tiny_train_config):
    outs = []
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        cfg = tiny_train_config(corpus_file, tmp_path / f"{name}.safetensors", seed=seed, sampling="random",
                                num_layers=2, dropout=0.3)
        run(cfg)
        outs.append(model_tensors(paths_for(cfg.out)["resume"]))
    a, b, c = outs
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# Resume -------------------------------------------------------------------------------------

RESUME_CASES = {
    "adam-consecutive": dict(optimizer="adam", sampling="consecutive"),
    "sgd-random": dict(optimizer="sgd", lr=1.0, sampling="random"),
    "adam-random-gru-dropout": dict(optimizer="adam", sampling="random", cell="gru", embed_size=6, num_layers=2,
                                    dropout=0.3),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resuming_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, corpus_file, tiny_train_config, case):
    options = RESUME_CASES[case]
    straight = tiny_train_config(corpus_file, tmp_path / "straight.safetensors", epochs=2, **options)
    run(straight)
    first = tiny_train_config(corpus_file, tmp_path / "resumed.safetensors", epochs=1, **options)
    run(first)
    second = replace(first, epochs=2, resume=True)
    result, logs = run(second)
    assert result.epochs_run == 1
    assert any("resuming" in line for line in logs)

    a = load_file(paths_for(straight.out)["resume"])
    b = load_file(paths_for(second.out)["resume"])
    assert sorted(a) == sorted(b)
    assert any(k.startswith("optim.") for k in a) == (options["optimizer"] == "adam")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ck_a, ck_b = load_checkpoint(straight.out), load_checkpoint(second.out)
    for k, v in ck_a.model.state_dict().items():
        assert torch.equal(v, ck_b.model.state_dict()[k]), k
    metrics = [json.loads(line) for line in paths_for(second.out)["metrics"].read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    straight_metrics = [json.loads(line) for line in paths_for(straight.out)["metrics"].read_text().splitlines()]
    assert [m["train_perplexity"] for m in metrics] == [m["train_perplexity"] for m in straight_metrics]


@pytest.fixture
def one_epoch(tmp_path, corpus_file, tiny_train_config):
    cfg = tiny_train_config(corpus_file, tmp_path / "m.safetensors", epochs=1)
    run(cfg)
    return cfg


@pytest.mark.parametrize("change,message", [
    (dict(hidden_size=24), "model"),
    (dict(cell="gru"), "model"),
    (dict(embed_size=4), "model"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(lr=0.5), "lr was"),
    (dict(batch_size=2), "batch_size was"),
    (dict(sampling="random"), "sampling was"),
    (dict(precision="bf16"), "precision was"),
])
def test_resuming_with_a_different_configuration_is_rejected(one_epoch, change, message):
    with pytest.raises(ValueError, match="--resume") as info:
        run(replace(one_epoch, epochs=2, resume=True, **change))
    assert message in str(info.value)


def test_resuming_on_another_corpus_is_rejected(one_epoch, tmp_path, corpus_text):
    other = tmp_path / "other.txt"
    other.write_text(corpus_text[::-1], encoding="utf-8")  # same characters, other text
    with pytest.raises(ValueError, match="another corpus"):
        run(replace(one_epoch, corpus=str(other), epochs=2, resume=True))


def test_resuming_a_finished_run_trains_nothing_and_says_so(one_epoch):
    result, logs = run(replace(one_epoch, resume=True))
    assert result.epochs_run == 0
    assert any("nothing to do" in line for line in logs)
    assert result.final_train_perplexity == result.history[-1]["train_perplexity"]


def test_resuming_without_a_saved_state_is_rejected(tmp_path, corpus_file, tiny_train_config):
    cfg = tiny_train_config(corpus_file, tmp_path / "never.safetensors", resume=True)
    with pytest.raises(FileNotFoundError, match="never.resume"):
        run(cfg)


# Bad inputs and logging ---------------------------------------------------------------------


def test_a_corpus_too_short_for_one_batch_is_rejected(tmp_path, tiny_train_config):
    path = tmp_path / "short.txt"
    path.write_text("分开的夜里 我唱着歌\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="too short for one batch"):
        run(tiny_train_config(path, tmp_path / "m.safetensors", batch_size=8, num_steps=10))
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("change", [dict(sampling="shuffled"), dict(epochs=0), dict(batch_size=0), dict(precision="fp16"),
                                    dict(num_steps=0), dict(optimizer="rmsprop")])
def test_invalid_options_are_rejected(tmp_path, corpus_file, tiny_train_config, change):
    with pytest.raises(ValueError):
        run(tiny_train_config(corpus_file, tmp_path / "m.safetensors", **change))


def test_samples_are_logged_for_prefixes_in_the_vocabulary(tmp_path, corpus_file, tiny_train_config):
    cfg = tiny_train_config(corpus_file, tmp_path / "m.safetensors", epochs=2, sample_every=1, sample_chars=10,
                            prefixes=["分开", "Zebra"])
    _, logs = run(cfg)
    samples = [line for line in logs if "sample:" in line]
    assert len(samples) == 2 and samples[0].startswith("epoch 1 sample: '分开")
    assert any("'Zebra' skipped" in line for line in logs)


@pytest.mark.parametrize("time_major", [False, True])
def test_flat_positions_pairs_every_position_with_its_target_without_copying(time_major):
    batch, steps, vocab = 3, 5, 7
    logits = torch.randn(steps, batch, vocab).transpose(0, 1) if time_major else torch.randn(batch, steps, vocab)
    Y = torch.randint(0, vocab, (batch, steps))
    flat, targets = flat_positions(logits, Y)
    assert flat.shape == (batch * steps, vocab) and flat.data_ptr() == logits.data_ptr()  # a view
    pairs = {(tuple(row.tolist()), int(y)) for row, y in zip(flat, targets, strict=True)}
    assert pairs == {(tuple(logits[b, t].tolist()), int(Y[b, t])) for b in range(batch) for t in range(steps)}


def test_the_progress_bar_moves_inside_an_epoch_with_batches_characters_per_second_and_time_left(
        tmp_path, corpus_file, tiny_train_config, capsys, monkeypatch):
    """A large corpus's epoch takes minutes: the bar must count its batches as they are done, not once per epoch."""
    import tqdm

    class EveryUpdate(tqdm.tqdm):  # draws every update
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "mininterval": 0})

    monkeypatch.setattr(tqdm, "tqdm", EveryUpdate)  # train() imports it when it runs
    cfg = tiny_train_config(corpus_file, str(tmp_path / "m.safetensors"), epochs=1, progress=True)
    train(cfg, log=lambda msg: None)
    err = capsys.readouterr().err
    batches = (len(load_corpus(corpus_file).train_ids) // cfg.batch_size - 1) // cfg.num_steps
    assert batches > 3
    assert f"batch 1/{batches}" in err and f"batch {batches}/{batches}" in err
    assert "epoch 1:" in err and "char/s" in err  # the epoch's bar: characters/s and, by tqdm, time left
