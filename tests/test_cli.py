import argparse
import json
import math
import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lyrics_cli import build_parser, main
from model_store.checkpoint import read_metadata, save_checkpoint
from model_store.constraints import Constraints
from model_store.generate import generate
from model_store.sampling import decoding
from model_store.scoring import score_text
from training.train import RECIPE, SIZED

TINY = ["--hidden-size", "16", "--num-steps", "8", "--batch-size", "4", "--epochs", "2", "--lr", "0.01",
        "--sample-every", "0", "--no-progress"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, trained):
    """A model directory holding the trained checkpoint as 'rnn'."""
    directory = tmp_path_factory.mktemp("models")
    shutil.copy(trained.path, directory / "rnn.safetensors")
    return directory


# train ----------------------------------------------------------------------------------------


def test_train_writes_the_checkpoint_and_records_the_exact_command(capsys, tmp_path, corpus_file):
    out_path = tmp_path / "out dir" / "gru 1.safetensors"  # spaces: the command must be quoted right
    argv = ["train", "--corpus", str(corpus_file), "--cell", "gru", "--embed-size", "8", "--out", str(out_path),
            "--prefixes", "分开", "la la", *TINY]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert out.startswith("done: best validation perplexity")
    assert str(out_path) in out
    meta = read_metadata(out_path)
    assert meta["config"]["cell"] == "gru" and meta["config"]["embed_size"] == 8
    assert meta["config"]["hidden_size"] == 16
    command = meta["training"]["command"]
    assert command == "lyrics " + shlex.join(argv)
    assert shlex.split(command)[1:] == argv
    assert meta["training"]["options"]["prefixes"] == ["分开", "la la"]
    # regularisation not given: chosen by the corpus's size, which for this small one is the recipe's
    assert meta["training"]["options"]["sized"] == ["dropout", "weight_drop", "label_smoothing"]
    assert {k: meta["training"]["options"][k] for k in SIZED} == {k: RECIPE[k] for k in SIZED}
    for suffix in (".resume", ".metrics.jsonl", ".curves.png"):
        assert (out_path.parent / f"gru 1{suffix}").is_file()


def test_train_with_a_missing_corpus_exits_2_naming_it(capsys, tmp_path):
    missing = tmp_path / "no_such_lyrics.txt"
    code, out, err = run_cli(capsys, "train", "--corpus", str(missing), "--cell", "rnn",
                             "--out", str(tmp_path / "m.safetensors"), *TINY)
    assert code == 2
    assert err.startswith("lyrics train: error:")
    assert "no_such_lyrics.txt" in err
    assert out == ""
    assert not (tmp_path / "m.safetensors").exists()


def test_train_with_an_empty_corpus_exits_2(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    code, _, err = run_cli(capsys, "train", "--corpus", str(empty), "--cell", "rnn",
                           "--out", str(tmp_path / "m.safetensors"), *TINY)
    assert code == 2
    assert "empty" in err and "empty.txt" in err
    assert len(err.strip().splitlines()) == 1


def test_train_fused_with_one_hot_input_exits_2(capsys, tmp_path, corpus_file):
    code, _, err = run_cli(capsys, "train", "--corpus", str(corpus_file), "--cell", "gru", "--impl", "fused",
                           "--embed-size", "0", "--out", str(tmp_path / "m.safetensors"), *TINY)
    assert code == 2 and "embed" in err


def test_resume_without_a_state_exits_2(capsys, tmp_path, corpus_file):
    code, _, err = run_cli(capsys, "train", "--corpus", str(corpus_file), "--cell", "rnn",
                           "--out", str(tmp_path / "m.safetensors"), "--resume", *TINY)
    assert code == 2 and "m.resume" in err


# generate ---------------------------------------------------------------------------------


def test_generate_json_prints_one_object_with_the_completion(capsys, model_dir, trained):
    code, out, err = run_cli(capsys, "generate", "--dir", str(model_dir), "--model", "rnn", "--prefix", "分开",
                             "--max-chars", "20", "--temperature", "0", "--json")
    assert code == 0, err
    body = json.loads(out)  # exactly one JSON document
    assert out.count("\n") == 1
    assert set(body) >= {"model", "prefix", "text", "generated", "finish_reason", "usage"}
    expected = generate(trained.model, trained.vocab, "分开", 20)[0]
    assert body["model"] == "rnn"
    assert body["prefix"] == "分开"
    assert body["generated"] == expected.generated
    assert body["text"] == "分开" + body["generated"]
    assert body["finish_reason"] == "length"
    assert body["usage"] == {"prompt_chars": 2, "generated_chars": 20}


def test_generate_without_decoding_options_samples_with_the_lyric_defaults(capsys, model_dir, trained):
    code, out, err = run_cli(capsys, "generate", "--dir", str(model_dir), "--model", "rnn", "--prefix", "分开",
                             "--max-chars", "40", "--seed", "5", "--json")
    assert code == 0, err
    expected = generate(trained.model, trained.vocab, "分开", 40, decoding(), seed=5)[0]
    assert json.loads(out)["generated"] == expected.generated
    code, out, err = run_cli(capsys, "generate", "--dir", str(model_dir), "--model", "rnn", "--prefix", "分开",
                             "--max-chars", "40", "--seed", "5", "--best-of", "2", "--best-of-chars", "3",
                             "--no-no-blank-runs", "--no-repeat-ngram", "0", "--max-char-run", "1",
                             "--min-line-chars", "4", "--json")
    assert code == 0, err
    params = decoding(best_of=2, best_of_chars=3, no_blank_runs=False, no_repeat_ngram=0, max_char_run=1,
                      min_line_chars=4)
    assert json.loads(out)["generated"] == generate(trained.model, trained.vocab, "分开", 40, params, seed=5)[0].generated


def test_generate_json_with_sampling_stop_and_n(capsys, model_dir, trained):
    code, out, _ = run_cli(capsys, "generate", "--dir", str(model_dir), "--model", "rnn", "--prefix", "la",
                           "--max-chars", "30", "--temperature", "0.9", "--top-k", "5", "--top-p", "0.95",
                           "--repetition-penalty", "1.1", "--seed", "11", "-n", "3", "--stop", "\n", "--json")
    assert code == 0
    body = json.loads(out)
    params = decoding(temperature=0.9, top_k=5, top_p=0.95, repetition_penalty=1.1)
    expected = generate(trained.model, trained.vocab, "la", 30, params, ["\n"], seed=11, n=3)
    assert [c["generated"] for c in body["choices"]] == [c.generated for c in expected]
    assert [c["seed"] for c in body["choices"]] == [11, 12, 13]
    assert body["usage"]["generated_chars"] == sum(len(c.generated) for c in expected)
    assert all("\n" not in c["generated"] for c in body["choices"])


def test_generate_without_json_prints_the_text(capsys, model_dir):
    code, out, _ = run_cli(capsys, "generate", "--dir", str(model_dir), "--prefix", "分开", "--max-chars", "5")
    assert code == 0
    assert out.startswith("分开") and len(out.rstrip("\n")) >= 5


def test_generate_with_unknown_prefix_characters_exits_2_naming_them(capsys, model_dir):
    code, out, err = run_cli(capsys, "generate", "--dir", str(model_dir), "--model", "rnn", "--prefix", "分开Q龙")
    assert code == 2
    assert out == ""
    assert "'Q'" in err and "'龙'" in err and "vocabulary" in err


def test_generate_with_an_unreadable_checkpoint_exits_2(capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(random.Random(0).randbytes(300))
    code, _, err = run_cli(capsys, "generate", "--model", str(bad), "--prefix", "a")
    assert code == 2
    assert "bad.safetensors" in err and "not a readable safetensors file" in err


def test_generate_with_a_missing_model_or_no_models_exits_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--dir", str(tmp_path), "--model", "ghost", "--prefix", "a")
    assert code == 2 and "ghost.safetensors" in err
    code, _, err = run_cli(capsys, "generate", "--dir", str(tmp_path), "--prefix", "a")
    assert code == 2 and "no loadable checkpoint" in err


def test_generate_with_an_out_of_range_setting_exits_2(capsys, model_dir):
    code, _, err = run_cli(capsys, "generate", "--dir", str(model_dir), "--prefix", "分开", "--top-p", "0")
    assert code == 2 and "top_p" in err


def test_a_space_policy_model_turns_prefix_newlines_into_spaces(capsys, tmp_path, trained):
    space_vocab_model = tmp_path / "space.safetensors"
    save_checkpoint(space_vocab_model, trained.model, trained.vocab, newlines="space")
    code, out, _ = run_cli(capsys, "generate", "--model", str(space_vocab_model), "--prefix", "分开\n",
                           "--max-chars", "3", "--json")
    assert code == 0
    assert json.loads(out)["prefix"] == "分开 "


# perplexity -------------------------------------------------------------------------------


def test_perplexity_json_prints_the_score(capsys, model_dir, trained, lyric):
    code, out, _ = run_cli(capsys, "perplexity", "--dir", str(model_dir), "--model", "rnn", "--text", lyric, "--json")
    assert code == 0
    body = json.loads(out)
    expected = score_text(trained.model, trained.vocab, lyric)
    assert body["chars_scored"] == len(lyric) - 1
    # the CLI scores with oneDNN-packed weights: float32 rounding differs
    assert body["cross_entropy"] == pytest.approx(expected.cross_entropy, rel=1e-5)
    assert body["perplexity"] == pytest.approx(math.exp(body["cross_entropy"]), rel=1e-9)
    assert body["unknown_skipped"] == 0
    assert body["model"] == "rnn"


def test_perplexity_of_a_file_with_unknown_characters(capsys, model_dir, tmp_path, lyric):
    path = tmp_path / "t.txt"
    path.write_text("QQ" + lyric + "龙", encoding="utf-8")
    code, _, err = run_cli(capsys, "perplexity", "--dir", str(model_dir), "--file", str(path))
    assert code == 2 and "'Q'" in err and "'龙'" in err
    code, out, _ = run_cli(capsys, "perplexity", "--dir", str(model_dir), "--file", str(path),
                           "--unknown", "skip", "--json")
    assert code == 0
    body = json.loads(out)
    assert body["unknown_skipped"] == 3 and body["chars_scored"] == len(lyric) - 1


def test_perplexity_without_json_prints_one_readable_line(capsys, model_dir, lyric):
    code, out, _ = run_cli(capsys, "perplexity", "--dir", str(model_dir), "--text", lyric)
    assert code == 0
    assert out.startswith("rnn: perplexity ") and f"over {len(lyric) - 1} characters" in out


def test_perplexity_per_char_json_lists_every_character_and_the_spans(capsys, model_dir, trained, lyric):
    text = "Q" + lyric
    code, out, _ = run_cli(capsys, "perplexity", "--dir", str(model_dir), "--text", text, "--unknown", "skip",
                           "--per-char", "--top-spans", "2", "--span-chars", "4", "--json")
    assert code == 0
    body = json.loads(out)
    assert [c["char"] for c in body["per_char"]] == list(text)
    assert body["per_char"][0]["nll"] is None and body["per_char"][1]["nll"] is None  # unknown 'Q', then the first
    scored = [c["nll"] for c in body["per_char"] if c["nll"] is not None]
    assert len(scored) == body["chars_scored"]
    assert sum(scored) / len(scored) == pytest.approx(body["cross_entropy"], rel=1e-9)
    expected = score_text(trained.model, trained.vocab, lyric, per_char=True)
    assert scored == pytest.approx([c.nll for c in expected.per_char[1:]], rel=1e-5, abs=1e-6)  # packed weights (see above)
    spans = body["surprising_spans"]
    assert len(spans) == 2 and all(s["end"] - s["start"] == 4 and text[s["start"]:s["end"]] == s["text"]
                                   for s in spans)
    assert spans[0]["nats"] >= spans[1]["nats"]


def test_perplexity_per_char_without_json_prints_the_spans_and_a_line_per_character(capsys, model_dir, lyric):
    code, out, _ = run_cli(capsys, "perplexity", "--dir", str(model_dir), "--text", lyric, "--per-char")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith("rnn: perplexity ")
    assert lines[1].startswith("most surprising 3-character spans") and len(lines) == 1 + 1 + 3 + 1 + len(lyric)
    assert lines[-len(lyric)].split("\t")[1:] == ['"分"', "-", "-"]


def test_perplexity_of_a_missing_file_exits_2(capsys, model_dir, tmp_path):
    code, _, err = run_cli(capsys, "perplexity", "--dir", str(model_dir), "--file", str(tmp_path / "gone.txt"))
    assert code == 2 and "gone.txt" in err


def test_perplexity_of_a_file_with_a_byte_order_mark_scores_like_the_training_corpus(capsys, model_dir, tmp_path,
                                                                                     lyric):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbf" + lyric.encode())
    code, out, err = run_cli(capsys, "perplexity", "--dir", str(model_dir), "--file", str(path), "--json")
    assert code == 0, err
    assert json.loads(out)["chars_scored"] == len(lyric) - 1


def test_perplexity_of_text_with_windows_line_endings_scores_like_the_corpus_would(capsys, model_dir, lyric):
    code, out, _ = run_cli(capsys, "perplexity", "--dir", str(model_dir), "--text", lyric, "--json")
    assert code == 0
    unix = json.loads(out)
    code, out, err = run_cli(capsys, "perplexity", "--dir", str(model_dir), "--text", lyric.replace("\n", "\r\n"),
                             "--json")
    assert code == 0, err
    assert json.loads(out)["cross_entropy"] == pytest.approx(unix["cross_entropy"], rel=1e-9)


# models -----------------------------------------------------------------------------------


def test_models_json_lists_the_models_and_the_default(capsys, tmp_path, trained):
    save_checkpoint(tmp_path / "good.safetensors", trained.model, trained.vocab, training={"val_perplexity": 1.5})
    save_checkpoint(tmp_path / "meh.safetensors", trained.model, trained.vocab, training={"val_perplexity": 9.0})
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    code, out, _ = run_cli(capsys, "models", "--dir", str(tmp_path), "--json")
    assert code == 0
    body = json.loads(out)
    assert body["default"] == "good"
    models = {m["name"]: m for m in body["models"]}
    assert set(models) == {"good", "meh"}
    assert models["good"]["default"] is True and models["meh"]["default"] is False
    assert models["good"]["val_perplexity"] == 1.5
    assert models["good"]["cell"] == "rnn" and models["good"]["vocab_size"] == len(trained.vocab)
    assert models["good"]["parameters"] == trained.model.num_parameters()
    assert list(body["skipped"]) == ["junk.safetensors"]


def test_models_without_json_marks_the_default(capsys, model_dir):
    code, out, _ = run_cli(capsys, "models", "--dir", str(model_dir))
    assert code == 0
    assert out.startswith("rnn (default): rnn 1x32")


def test_models_in_an_empty_directory(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "models", "--dir", str(tmp_path), "--json")
    assert code == 0
    assert json.loads(out) == {"default": None, "models": [], "skipped": {}}


# help -------------------------------------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_there_are_the_documented_subcommands():
    assert {"train", "generate", "perplexity", "models"} <= set(subcommands())


@pytest.mark.parametrize("name", sorted(subcommands()))
def test_help_for_each_subcommand_exits_0_and_mentions_every_option(capsys, name):
    with pytest.raises(SystemExit) as info:
        main([name, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    options = [s for a in subcommands()[name]._actions for s in a.option_strings]
    assert "--help" in options and len(options) > 2
    for option in options:
        assert option in out, option


def test_top_level_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in ("train", "generate", "perplexity", "models"):
        assert name in out


def test_a_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["generate"])  # --prefix is required
    assert info.value.code == 2
    assert "--prefix" in capsys.readouterr().err


def test_the_lyrics_console_script_runs():
    script = Path(sys.executable).parent / "lyrics"
    assert script.is_file(), "pip install -e . installs the `lyrics` console script"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("train", "generate", "perplexity", "models"):
        assert name in proc.stdout


def test_generate_with_structure_constraints(capsys, model_dir, trained):
    code, out, _ = run_cli(capsys, "generate", "--dir", str(model_dir), "--model", "rnn", "--prefix", "我",
                           "--max-chars", "100", "--temperature", "1", "--seed", "3", "--lines", "3",
                           "--line-lengths", "4-6-4", "--rhyme", "--banned", "的", "--json")
    assert code == 0
    body = json.loads(out)
    lines = body["generated"].split("\n")
    assert [len(line) for line in lines] == [4, 6, 4, 0] and "的" not in body["generated"]
    assert body["constraints_met"] == {"lines": True, "line_lengths": True, "banned": True, "rhyme": True}
    constraints = Constraints(3, "4-6-4", "的", rhyme=True)
    expected = generate(trained.model, trained.vocab, "我", 100, decoding(1.0), seed=3, constraints=constraints)
    assert body["choices"][0]["generated"] == expected[0].generated


def test_generate_with_impossible_constraints_exits_2(capsys, model_dir):
    code, out, err = run_cli(capsys, "generate", "--dir", str(model_dir), "--model", "rnn", "--prefix", "我",
                             "--max-chars", "10", "--lines", "3", "--line-lengths", "7")
    assert code == 2 and out == "" and "max_chars is 10" in err


def test_generate_into_a_pipe_closed_early_ends_without_a_traceback(model_dir):
    """`lyrics generate ... | head -1`: the reader leaves long before 64 continuations (~100 kB) are written."""
    process = subprocess.Popen([sys.executable, "-m", "lyrics_cli", "generate", "--dir", str(model_dir), "--model",
                                "rnn", "--prefix", "分开", "--max-chars", "500", "-n", "64", "--temperature", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.read(10)
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141
    assert "Traceback" not in err


# layering ---------------------------------------------------------------------------------------


def loaded_packages(code: str, env: dict | None = None) -> set[str]:
    """The top-level project packages a fresh interpreter has imported after running `code`."""
    probe = code + "\nimport sys; print(sorted({m.split('.')[0] for m in sys.modules} & {'app', 'training'}))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=120,
                         env=env).stdout
    return set(json.loads(out.strip().splitlines()[-1].replace("'", '"')))


def test_packages_import_downward_only():
    """app -> model_store <- training, with the command line above them: it loads the service only to
    serve, and neither package loads the other."""
    assert loaded_packages("import lyrics_cli; lyrics_cli.build_parser()") == {"training"}
    assert loaded_packages("import app.main, app.server") == {"app"}
    assert loaded_packages("import training.train, training.mix, training.poetry, training.distributed") == {"training"}
    assert loaded_packages("import model_store.generate, model_store.registry, model_store.mixture") == set()


def test_the_command_line_works_without_the_train_extra(model_dir):
    """A serving install (`lyrics-rnn[serve]`) has neither tqdm nor matplotlib: the model commands still run,
    and `train` says which extra it needs instead of a traceback."""
    code = f"""
import sys
sys.modules["tqdm"] = sys.modules["matplotlib"] = None  # as if not installed
from lyrics_cli import main
assert main(["models", "--dir", {str(model_dir)!r}]) == 0
assert main(["train", "--corpus", "c.txt", "--cell", "rnn", "--out", "x.safetensors"]) == 2
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "rnn (default): rnn 1x" in done.stdout
    assert "lyrics train: error: " in done.stderr and "install lyrics-rnn[train]" in done.stderr


def test_the_command_line_shortens_openmp_spinning_unless_told():
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    code = "import os, lyrics_cli, torch; print(os.environ['GOMP_SPINCOUNT'])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True).stdout.strip() == "10000"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**env, "GOMP_SPINCOUNT": "500"}).stdout.strip() == "500"
