"""The `lyrics` command line, above the three packages it drives: train, mix and poetry-corpus
(training), generate, perplexity and models (model_store), serve (app).

Each command imports its package when it runs, so `lyrics serve` loads nothing of training and an
install without the `[train]` extra still serves. `generate`, `perplexity` and `models` take
`--json` and then print one JSON object, the same shape as the service's HTTP answer. Errors print
one line to stderr and exit 2. Under torchrun: `torchrun ... -m lyrics_cli train ...`.
"""

from __future__ import annotations

import os

# libgomp (torch's OpenMP runtime) reads this once, when torch loads it, so it is set before any
# import of torch. Its default spins an idle worker thread for about 300,000 rounds before it
# sleeps: between the serving engine's small steps the second core then burns in the spin what
# the event loop needed. 10,000 rounds keep its wake-up as fast within a step (docs/benchmarks.md,
# "Short requests"). A value in the environment wins.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from model_store.checkpoint import CheckpointError  # noqa: E402
from model_store.registry import BUNDLED_DIR  # noqa: E402
from model_store.sampling import LYRIC_DEFAULTS  # noqa: E402
from model_store.vocab import UnknownCharactersError  # noqa: E402
from training.corpus import CorpusError  # noqa: E402
from training.poetry import PARTS as POETRY_PARTS  # noqa: E402
from training.train import DEFAULT_LR, RECIPE, SIZED, SIZED_RANGE  # noqa: E402


def sized_help(name: str) -> str:
    small, large = SIZED[name]
    if small == large:
        return f"{small:g}"
    return (f"{small:g} up to {SIZED_RANGE[0]:,} training characters, {large:g} from {SIZED_RANGE[1]:,}, "
            "log-linear between")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lyrics", description="Character-level RNN/GRU/LSTM lyric models.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on a text corpus",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Train a character language model and write a self-describing checkpoint. "
                                   "The best model by validation perplexity is kept at --out; NAME.resume, "
                                   "NAME.metrics.jsonl and NAME.curves.png are written beside it.")
    t.add_argument("--corpus", required=True, help="UTF-8 text file to learn from")
    t.add_argument("--cell", required=True, choices=["rnn", "gru", "lstm"], help="recurrent cell")
    t.add_argument("--out", required=True, help="checkpoint path, e.g. model_store/checkpoints/gru.safetensors")
    t.add_argument("--impl", default="auto", choices=["auto", "scratch", "fused"],
                   help="scratch: per-step equations; fused: torch.nn.RNN/GRU/LSTM (needs --embed-size > 0); "
                        "auto: fused with an embedding, scratch with one-hot input")
    t.add_argument("--hidden-size", type=positive_int, default=256, help="hidden units per layer")
    t.add_argument("--num-layers", type=positive_int, default=1, help="stacked recurrent layers")
    t.add_argument("--embed-size", type=non_negative_int, default=RECIPE["embed_size"],
                   help="0: one-hot input as the tutorial; N: a learned N-wide character embedding "
                        "(default: the hidden size)")
    t.add_argument("--dropout", type=float, default=None,
                   help="dropout on the embedding, between stacked layers and before the output layer "
                        f"(default: {sized_help('dropout')})")
    t.add_argument("--num-steps", type=positive_int, default=RECIPE["num_steps"],
                   help="characters per training sequence (BPTT)")
    t.add_argument("--batch-size", type=positive_int, default=32,
                   help="sequences per minibatch over all processes (under torchrun each of N processes computes "
                        "batch-size / N of them)")
    t.add_argument("--epochs", type=positive_int, default=RECIPE["epochs"], help="passes over the training part")
    t.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default: {DEFAULT_LR['adamw']} for adamw, {DEFAULT_LR['adam']} for adam, "
                        f"{DEFAULT_LR['sgd']} for sgd)")
    t.add_argument("--optimizer", default=RECIPE["optimizer"], choices=["sgd", "adam", "adamw"],
                   help="optimizer (adamw: Adam with decoupled weight decay)")
    t.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clipping threshold (0: off)")
    t.add_argument("--weight-decay", type=float, default=RECIPE["weight_decay"],
                   help="weight decay (decoupled with adamw, L2 with sgd and adam)")
    t.add_argument("--label-smoothing", type=float, default=None,
                   help="share of each target's probability spread over the whole vocabulary "
                        f"(default: {sized_help('label_smoothing')})")
    t.add_argument("--weight-drop", type=float, default=None,
                   help=f"DropConnect on the recurrent weights W_hh while training (default: {sized_help('weight_drop')})")
    t.add_argument("--tie-weights", action=argparse.BooleanOptionalAction, default=RECIPE["tie_weights"],
                   help="the output layer reuses the embedding matrix (needs --embed-size equal to --hidden-size; "
                        "default: tie when they are equal)")
    t.add_argument("--schedule", default=RECIPE["schedule"], choices=["constant", "cosine"],
                   help="learning rate: constant, or cosine decay to zero over --epochs")
    t.add_argument("--patience", type=non_negative_int, default=RECIPE["patience"],
                   help="stop after this many evaluations without a better validation perplexity (0: never)")
    t.add_argument("--init-std", type=float, default=0.0,
                   help="0: torch's default initialisation; S > 0: weights from N(0, S) and zero biases "
                        "(the tutorial uses 0.01)")
    t.add_argument("--single-bias", action="store_true",
                   help="hold the recurrent biases b_hh at zero, leaving one bias per gate as the tutorial's cells "
                        "have (torch's have two, b_ih + b_hh, which under SGD move twice as fast)")
    t.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: mixed precision, forward matmuls in bfloat16 (faster on CPUs with AVX512-BF16/AMX and "
                        "on GPUs); weights, optimizer and loss stay float32")
    t.add_argument("--sampling", default="consecutive", choices=["random", "consecutive"],
                   help="random: shuffled examples, fresh state per batch; consecutive: state carried")
    t.add_argument("--val-frac", type=float, default=0.1, help="last fraction of the corpus held out for validation")
    t.add_argument("--newlines", default="keep", choices=["keep", "space"],
                   help="keep line breaks, or turn them into spaces as the tutorial")
    t.add_argument("--max-chars", type=positive_int, default=None,
                   help="use only the first N characters (the tutorial uses 10000)")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    t.add_argument("--seed", type=int, default=0, help="random seed (runs on CPU are reproducible)")
    t.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from this checkpoint's weights (same cell and sizes; characters matched by character, "
                        "so it may have another vocabulary): fine-tune a model pretrained with lyrics poetry-corpus")
    t.add_argument("--resume", action="store_true", help="continue from NAME.resume beside --out")
    t.add_argument("--eval-every", type=positive_int, default=1, help="epochs between validation runs")
    t.add_argument("--sample-every", type=non_negative_int, default=10, help="epochs between sample lines (0: never)")
    t.add_argument("--sample-chars", type=positive_int, default=50, help="characters per sample line")
    t.add_argument("--prefixes", nargs="*", default=["分开", "不分开"], help="prefixes for sample lines")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    x = sub.add_parser("mix", help="build a mixture: recurrent model + Kneser-Ney n-gram + cache of the text",
                       description="Combine a trained recurrent model with a Kneser-Ney n-gram of its training "
                                   "text and a cache of the text being scored or continued. The weights are fitted "
                                   "by EM on the held-out tail of --tune-model, the same recipe trained with "
                                   "--max-chars equal to --model's training characters, so no weight is fitted "
                                   "on validation text.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    x.add_argument("--corpus", required=True, help="the corpus both models were trained on")
    x.add_argument("--model", required=True, help="the recurrent checkpoint to serve in the mixture")
    x.add_argument("--tune-model", required=True,
                   help="the same recipe trained on --model's training part only (--max-chars N)")
    x.add_argument("--out", required=True, help="mixture checkpoint to write (.safetensors)")
    x.add_argument("--order", type=positive_int, default=7, help="n-gram order (characters, context + 1)")
    x.add_argument("--cache-order", type=positive_int, default=6, help="longest context the cache matches")
    x.add_argument("--cache-window", type=positive_int, default=2048, help="characters of text the cache keeps")
    x.add_argument("--no-ngram", dest="ngram", action="store_false",
                   help="no n-gram: the recurrent model and the cache of the text alone")

    c = sub.add_parser("poetry-corpus", help="pretraining text from the npm package chinese-poetry",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Read the archive of `npm pack chinese-poetry@2.0.1` (Song ci and Yuan qu) and "
                                   "write a text laid out like the lyric corpus, keeping the lines made of the "
                                   "lyric corpus's training characters and the most frequent others. OUT.source.json "
                                   "records how; lyrics train copies it into the checkpoint.")
    c.add_argument("--package", required=True, help="chinese-poetry-2.0.1.tgz, from npm pack")
    c.add_argument("--out", required=True, help="text file to write")
    c.add_argument("--vocab-from", required=True, help="the lyric corpus (only its training part is read)")
    c.add_argument("--val-frac", type=float, default=0.1, help="the lyric corpus's validation fraction")
    c.add_argument("--extra-chars", type=non_negative_int, default=1000,
                   help="characters outside the lyric corpus that lines may also use, the most frequent first")
    c.add_argument("--parts", nargs="+", default=sorted(POETRY_PARTS), choices=sorted(POETRY_PARTS),
                   help="which collections to read")

    g = sub.add_parser("generate", help="continue a prefix", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(g)
    g.add_argument("--prefix", required=True, help="text to continue (every character must be in the vocabulary)")
    g.add_argument("--max-chars", type=non_negative_int, default=50, help="characters to generate at most")
    lyric = LYRIC_DEFAULTS
    g.add_argument("--temperature", type=float, default=None,
                   help=f"0: greedy, as the tutorial's predict (and the options below off unless given); "
                        f"omitted: {lyric['temperature']}, with the lyric defaults below")
    g.add_argument("--top-k", type=non_negative_int, default=0, help="sample among the k likeliest (0: all)")
    g.add_argument("--top-p", type=float, default=None, help=f"nucleus sampling mass (sampled: {lyric['top_p']})")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeated characters")
    g.add_argument("--no-repeat-ngram", type=non_negative_int, default=None, metavar="N",
                   help="N >= 2: never generate an N-character sequence already in the prefix or the output "
                        f"(0: off; sampled: {lyric['no_repeat_ngram']})")
    g.add_argument("--no-blank-runs", action=argparse.BooleanOptionalAction, default=None,
                   help="never a blank (space, line break) right after a blank (sampled: on)")
    g.add_argument("--max-char-run", type=non_negative_int, default=None, metavar="K",
                   help=f"K >= 1: never one character more than K times in a row (0: off; sampled: "
                        f"{lyric['max_char_run']})")
    g.add_argument("--min-line-chars", type=non_negative_int, default=None, metavar="K",
                   help=f"K >= 1: no line break before a line has K characters (0: off; sampled: "
                        f"{lyric['min_line_chars']})")
    g.add_argument("--best-of", type=positive_int, default=None, metavar="K",
                   help=f"K candidates per continuation, the likeliest kept every --best-of-chars characters "
                        f"(sampled: {lyric['best_of']})")
    g.add_argument("--best-of-chars", type=positive_int, default=None, metavar="C",
                   help=f"how often --best-of compares its candidates (default {lyric['best_of_chars']})")
    g.add_argument("--stop", action="append", default=[], help="stop when this string is generated (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (same seed, same text)")
    g.add_argument("-n", type=positive_int, default=1, help="number of continuations")
    g.add_argument("--lines", type=positive_int, default=None, help="constraint: exactly this many lines")
    g.add_argument("--line-lengths", default=None, help="constraint: characters per line, e.g. 7 or 7-7-7-7")
    g.add_argument("--rhyme", nargs="?", const=True, default=None,
                   help="constraint (with --line-lengths): line endings share a final; give one, e.g. ang, or "
                        "none to take the first line's")
    g.add_argument("--banned", default="", help="constraint: characters never generated")
    g.add_argument("--required", default="", help="constraint: characters that must appear")
    g.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("perplexity", help="score a text", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text to score")
    src.add_argument("--file", help="UTF-8 file to score")
    p.add_argument("--unknown", default="error", choices=["error", "skip"],
                   help="characters outside the vocabulary: fail, or drop them and count them")
    p.add_argument("--per-char", action="store_true",
                   help="also every character's nll (nats and bits) and the most surprising spans")
    p.add_argument("--top-spans", type=non_negative_int, default=3, help="with --per-char: how many spans")
    p.add_argument("--span-chars", type=positive_int, default=3, help="with --per-char: characters per span")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    m = sub.add_parser("models", help="list the checkpoints in a directory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--dir", default=str(BUNDLED_DIR), help="model directory")
    m.add_argument("--json", action="store_true", help="print one JSON object")

    s = sub.add_parser("serve", help="start the HTTP service (uvicorn)",
                       description="Serve every checkpoint in the model directory over HTTP. Options override "
                                   "the LYRICS_* environment variables; every other setting (limits, default "
                                   "model) comes from the environment.")
    s.add_argument("--host", default=None, help="interface to bind (LYRICS_HOST, default 127.0.0.1)")
    s.add_argument("--port", type=int, default=None, help="TCP port (LYRICS_PORT, default 8000)")
    s.add_argument("--model-dir", default=None, help="directory of .safetensors checkpoints (LYRICS_MODEL_DIR, "
                                                    "default: the bundled models)")
    s.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (LYRICS_DEVICE, default auto)")
    s.add_argument("--log-level", default=None, help="debug, info, warning or error (LYRICS_LOG_LEVEL, default info)")
    s.add_argument("--log-format", default=None, choices=["text", "json"],
                   help="json: one JSON object per log line (LYRICS_LOG_FORMAT, default text)")
    return parser


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model name in --dir, or a checkpoint path (default: the best)")
    p.add_argument("--dir", default=str(BUNDLED_DIR), help="model directory for names")
    p.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N")


def open_model(args):
    from model_store.checkpoint import load_checkpoint
    from model_store.registry import load_directory, resolve, resolve_device

    device = resolve_device(args.device)
    if args.model is None:
        loaded = load_directory(args.dir, device, pack=True)
        if not loaded.models:
            raise CheckpointError(f"no loadable checkpoint in {args.dir}")
        return loaded.models[loaded.default]
    return load_checkpoint(resolve(args.model, args.dir), device=device, pack=True)


def cmd_train(args) -> int:
    from training import distributed
    from training.train import TrainConfig, train

    options = {k: v for k, v in vars(args).items() if k not in ("command", "no_progress", "argv")}
    if options["embed_size"] is None:
        options["embed_size"] = options["hidden_size"]
    if options["tie_weights"] is None:
        options["tie_weights"] = options["embed_size"] == options["hidden_size"]
    sized = tuple(name for name in SIZED if options[name] is None)  # chosen by the corpus's size in train()
    options.update({name: RECIPE[name] for name in sized})
    cfg = TrainConfig(**options, progress=not args.no_progress, command="lyrics " + shlex.join(args.argv),
                      sized=sized)
    with distributed.process_group(cfg.device):  # only under torchrun
        result = train(cfg)
        main = distributed.is_main()
    if not main:
        return 0
    best = f"{result.best_val_perplexity:.2f}" if result.best_val_perplexity else "n/a"
    print(f"done: best validation perplexity {best} at epoch {result.best_epoch}, "
          f"final train perplexity {result.final_train_perplexity:.2f}; checkpoint {cfg.out}")
    return 0


def cmd_mix(args) -> int:
    from training.mix import MixConfig, mix

    options = {k: v for k, v in vars(args).items() if k not in ("command", "argv")}
    summary = mix(MixConfig(**options, command="lyrics " + shlex.join(args.argv)))
    ppl = summary.get("val_perplexity")
    print(f"done: mixture {args.out}, validation perplexity {ppl:.2f}" if ppl else f"done: mixture {args.out}")
    return 0


def cmd_poetry_corpus(args) -> int:
    from training.poetry import build

    record = build(args.package, args.out, args.vocab_from, args.extra_chars, args.parts,
                                 args.val_frac, command="lyrics " + shlex.join(args.argv))
    print(f"done: {args.out}, {record['lines_kept']:,} of {record['lines_read']:,} lines, {record['chars']:,} "
          f"characters, {record['distinct_chars']:,} distinct")
    return 0


def cmd_generate(args) -> int:
    from model_store.constraints import Constraints
    from model_store.generate import generate
    from model_store.sampling import decoding
    from model_store.vocab import normalise_newlines

    ck = open_model(args)
    params = decoding(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.no_repeat_ngram,
                      args.no_blank_runs, args.best_of, args.best_of_chars, args.max_char_run,
                      args.min_line_chars)
    prefix = normalise_newlines(args.prefix, ck.newlines)
    constraints = None
    if args.lines or args.line_lengths or args.rhyme or args.banned or args.required:
        constraints = Constraints(args.lines, args.line_lengths, args.banned, args.required, args.rhyme)
    choices = generate(ck.model, ck.vocab, prefix, args.max_chars, params, args.stop, args.seed, args.n,
                       constraints=constraints)
    if args.json:
        met = {"constraints_met": choices[0].constraints_met} if constraints else {}
        body = {"model": ck.name, "prefix": prefix, "text": choices[0].text, "generated": choices[0].generated,
                "finish_reason": choices[0].finish_reason, "seed": choices[0].seed, **met,
                "choices": [{"index": i, "text": c.text, "generated": c.generated, "finish_reason": c.finish_reason,
                             "seed": c.seed, **({"constraints_met": c.constraints_met} if constraints else {})}
                            for i, c in enumerate(choices)],
                "usage": {"prompt_chars": len(prefix), "generated_chars": sum(len(c.generated) for c in choices)}}
        print(json.dumps(body, ensure_ascii=False))
    else:
        for c in choices:
            print(c.text)
    return 0


def cmd_perplexity(args) -> int:
    from model_store.scoring import score_text
    from model_store.surprisal import surprisal_json
    from model_store.vocab import normalise_newlines

    ck = open_model(args)
    text = args.text if args.text is not None else read_text(args.file)
    text = normalise_newlines(text, ck.newlines)
    s = score_text(ck.model, ck.vocab, text, unknown=args.unknown, per_char=args.per_char)
    body = {"model": ck.name, "perplexity": s.perplexity, "cross_entropy": s.cross_entropy,
            "bits_per_char": s.bits_per_char, "chars_scored": s.chars_scored, "unknown_skipped": s.unknown_skipped}
    if args.per_char:
        body.update(surprisal_json(s, args.top_spans, args.span_chars))
    print(json.dumps(body, ensure_ascii=False) if args.json else
          f"{ck.name}: perplexity {s.perplexity:.3f}, cross-entropy {s.cross_entropy:.4f} nats/char "
          f"over {s.chars_scored} characters" + (f" ({s.unknown_skipped} unknown skipped)" if s.unknown_skipped else ""))
    if args.per_char and not args.json:
        print_surprisal(body, args.span_chars)
    return 0


def print_surprisal(body: dict, span_chars: int) -> None:
    """The spans, then one line per character (offset, character, nats, bits; '-' where none was predicted)."""
    def shown(text: str) -> str:
        return json.dumps(text, ensure_ascii=False)

    print(f"most surprising {span_chars}-character spans (total over the scored characters):")
    for span in body["surprising_spans"]:
        print(f"  [{span['start']}, {span['end']}) {shown(span['text'])}: {span['nats']:.3f} nats "
              f"({span['bits']:.3f} bits), {span['mean_nats']:.3f} nats per character")
    print("per character (offset, character, nats, bits):")
    for i, c in enumerate(body["per_char"]):
        nll = "-\t-" if c["nll"] is None else f"{c['nll']:.4f}\t{c['nll_bits']:.4f}"
        print(f"  {i}\t{shown(c['char'])}\t{nll}")


def cmd_models(args) -> int:
    from model_store.registry import describe, load_directory

    loaded = load_directory(args.dir)
    infos = [describe(ck, loaded.default) for ck in loaded.models.values()]
    if args.json:
        print(json.dumps({"default": loaded.default, "models": infos, "skipped": loaded.skipped}, ensure_ascii=False))
        return 0
    if not infos:
        print(f"no loadable checkpoint in {args.dir}")
    for i in infos:
        val = f"{i['val_perplexity']:.2f}" if i["val_perplexity"] else "n/a"
        mark = " (default)" if i["default"] else ""
        parts = " + ".join(["", *i["mixture"]["components"][1:]]) if i["mixture"] else ""  # " + ngram + cache"
        print(f"{i['name']}{mark}: {i['cell']} {i['num_layers']}x{i['hidden_size']}{parts}, vocab {i['vocab_size']}, "
              f"{i['parameters']:,} parameters, validation perplexity {val}")
    for name, reason in loaded.skipped.items():
        print(f"skipped {name}: {reason}", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from app.server import OPTIONS, serve

    serve(**{option: getattr(args, option) for option in OPTIONS})
    return 0


def read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"cannot read {path}: {e}") from e


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "perplexity": cmd_perplexity, "models": cmd_models,
            "serve": cmd_serve, "mix": cmd_mix, "poetry-corpus": cmd_poetry_corpus}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return COMMANDS[args.command](args)
    except (CheckpointError, CorpusError, UnknownCharactersError, ValueError, FileNotFoundError) as e:
        print(f"lyrics {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # installed without the extra this command needs
        extra = "train" if args.command in ("train", "mix", "poetry-corpus") else "serve"
        print(f"lyrics {args.command}: error: {e}; install lyrics-rnn[{extra}]", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lyrics {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`lyrics generate ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
