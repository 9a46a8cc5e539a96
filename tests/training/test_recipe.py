"""The regularised recipe's options: label smoothing, weight drop, tied weights, AdamW, a cosine
schedule and early stopping."""

import json
import math

import pytest

from model_store.checkpoint import load_checkpoint, read_metadata
from training.train import learning_rate_at, train


def metrics(cfg):
    return [json.loads(line) for line in open(cfg.out.replace(".safetensors", ".metrics.jsonl"))]


def test_label_smoothing_changes_the_loss_but_not_the_reported_perplexity(tmp_path, corpus_file, tiny_train_config):
    """With lr 0 the weights never move, so both runs see the same model: the perplexity they report
    must be the plain one, not the smoothed loss."""
    runs = [train(tiny_train_config(corpus_file, str(tmp_path / f"{s}.safetensors"), lr=0.0, epochs=1,
                                    label_smoothing=s), log=lambda m: None) for s in (0.0, 0.3)]
    assert runs[0].history[0]["train_perplexity"] == pytest.approx(runs[1].history[0]["train_perplexity"], rel=1e-6)


def test_label_smoothing_keeps_probability_on_characters_never_seen_as_targets(tmp_path, corpus_file,
                                                                               tiny_train_config):
    floors = {}
    for s in (0.0, 0.2):
        cfg = tiny_train_config(corpus_file, str(tmp_path / f"{s}.safetensors"), lr=0.05, epochs=6,
                                embed_size=8, cell="gru", label_smoothing=s)
        train(cfg, log=lambda m: None)
        import torch
        model = load_checkpoint(cfg.out).model
        with torch.no_grad():
            floors[s] = torch.softmax(model(torch.tensor([[0, 1, 2, 3]]))[0][0, -1], -1).min().item()
    assert floors[0.2] > 3 * floors[0.0]


def test_the_cosine_schedule_decays_from_the_learning_rate_to_zero(tmp_path, corpus_file, tiny_train_config):
    cfg = tiny_train_config(corpus_file, str(tmp_path / "m.safetensors"), lr=0.02, epochs=4, schedule="cosine")
    assert [learning_rate_at(cfg, e) for e in range(4)] == pytest.approx(
        [0.02 * 0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])
    train(cfg, log=lambda m: None)
    lrs = [m["lr"] for m in metrics(cfg)]
    assert lrs[0] == 0.02 and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.005


def test_early_stopping_ends_the_run_after_patience_evaluations_without_progress(tmp_path, corpus_file,
                                                                                 tiny_train_config):
    cfg = tiny_train_config(corpus_file, str(tmp_path / "m.safetensors"), lr=0.0, epochs=10, patience=2)
    logs = []
    result = train(cfg, log=logs.append)
    assert [h["epoch"] for h in result.history] == [1, 2, 3]  # epoch 1 is best; 2 and 3 do not beat it
    assert any("early stop after epoch 3" in line for line in logs)
    assert read_metadata(cfg.out)["training"]["best_epoch"] == 1


def test_the_regularised_recipe_trains_and_saves_a_tied_weight_drop_model(tmp_path, corpus_file, tiny_train_config):
    cfg = tiny_train_config(corpus_file, str(tmp_path / "m.safetensors"), cell="lstm", hidden_size=12, embed_size=12,
                            tie_weights=True, weight_drop=0.3, dropout=0.2, label_smoothing=0.1, optimizer="adamw",
                            weight_decay=0.01, lr=0.02, schedule="cosine", epochs=4)
    result = train(cfg, log=lambda m: None)
    assert result.history[-1]["train_perplexity"] < result.history[0]["train_perplexity"]
    config = load_checkpoint(cfg.out).config
    assert config.tie_weights and config.weight_drop == 0.3


def test_sized_regularisation_is_the_recipe_on_small_corpora_and_lighter_on_large_ones():
    from training.train import RECIPE, SIZED, SIZED_RANGE, sized_regularisation

    small, large = SIZED_RANGE
    assert sized_regularisation(56_954) == sized_regularisation(small) == {k: RECIPE[k] for k in SIZED}
    assert sized_regularisation(large) == sized_regularisation(50 * large) == {k: v[1] for k, v in SIZED.items()}
    middle = sized_regularisation(round(math.sqrt(small * large)))  # halfway on a log scale
    assert middle["dropout"] == pytest.approx((SIZED["dropout"][0] + SIZED["dropout"][1]) / 2, abs=1e-3)
    sizes = [small, 200_000, 600_000, large]
    assert [sized_regularisation(n)["dropout"] for n in sizes] == sorted(
        (sized_regularisation(n)["dropout"] for n in sizes), reverse=True)


def test_options_left_to_the_corpus_size_are_chosen_from_the_training_part(tmp_path, corpus_file, tiny_train_config,
                                                                            monkeypatch):
    import training.train as training_train

    monkeypatch.setattr(training_train, "SIZED_RANGE", (10, 100))  # this small corpus counts as a large one
    cfg = tiny_train_config(corpus_file, str(tmp_path / "m.safetensors"), epochs=1, dropout=0.5, weight_drop=0.5,
                            label_smoothing=0.1, sized=("dropout", "weight_drop"))
    logs = []
    train(cfg, log=logs.append)
    options = read_metadata(cfg.out)["training"]["options"]
    large = {k: v[1] for k, v in training_train.SIZED.items()}
    assert options["dropout"] == large["dropout"] and options["weight_drop"] == large["weight_drop"]
    assert options["label_smoothing"] == 0.1  # given, so not resized
    assert load_checkpoint(cfg.out).model.config.dropout == large["dropout"]
    assert any(f"dropout {large['dropout']:g}, weight-drop {large['weight_drop']:g}" in line for line in logs)
