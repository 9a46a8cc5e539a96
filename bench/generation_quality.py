"""Generation quality: what `/generate` writes, measured the way a reader judges lyrics.

For every configuration it starts a real `lyrics serve` on the given checkpoints, sends one
request per prefix (48 two-character words a lyricist might start with, not only corpus
openings) with `max_chars` 100 and the configuration's other fields (none: the service's
defaults), and measures the generated characters against real held-out lyrics: the
validation part (last 10%) of the corpus, cut into the same shape (2 characters of context,
the next 100 scored).

* loops: share of an answer's 4-character sequences that already occurred earlier in it;
* copied: share of its 8-character runs that occur verbatim anywhere in the corpus file (for
  the real lyrics: in the training part);
* hooks: share of answers holding a 6-character run (no blanks) that the training part repeats
  5 times or more: a chorus line learned by heart (快使用双截棍), which the 8-character copy
  measure misses and a reader meets in answer after answer;
* words: share of its Chinese characters inside multi-character words of jieba's own
  dictionary (jieba, HMM off: its dictionary was built from other text, not this corpus);
* variety: distinct 4-character sequences over all answers pooled, per sequence (a model that
  says the same few lines whatever the prefix scores low, even if no answer loops);
* stutters: per 100 generated characters, a character written three times in a row (静静静) or
  two characters twice (怎么怎么), which no_repeat_ngram does not catch inside one line;
* lines: mean length of its complete lines, and the share of answers with a run of blanks
  (two line breaks, or three whitespace characters, in a row);
* judge: perplexity of the answer, given its prefix, under a Kneser-Ney 7-gram of the
  corpus's training part alone (an independent judge of style), as a ratio to the real
  lyrics' perplexity under the same judge.

    python bench/generation_quality.py --corpus ../shared/data/jaychou_lyrics.txt \\
        --config default= --config 'greedy={"temperature": 0}' [--model-dir DIR --model NAME]

`--final NAME=RUN.safetensors` also serves, as NAME, the last epoch of that training run (its
NAME.resume beside it), not its best: the tutorial's 250-epoch model that memorised the corpus.

Each --config is LABEL=JSON (the request's fields besides prefix and max_chars; LABEL= alone
sends none, the defaults). Prints one markdown table and, with --samples, one answer per
prefix for the first few prefixes; --json writes every answer and number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import jieba
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project, if not installed

from model_store.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from model_store.ngram import KneserNey  # noqa: E402
from training.corpus import load_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Two-character openings a lyricist might use: feelings, places, times, images; some are corpus
# openings (分开, 我想), most are not.
PREFIXES = ("分开", "我想", "天空", "回忆", "雨天", "爱情", "夜晚", "风中", "离开", "想念", "眼泪", "城市",
            "街角", "微笑", "梦里", "月光", "心跳", "时间", "青春", "远方", "温柔", "孤单", "窗外", "黄昏",
            "秋天", "星星", "故事", "世界", "明天", "如果", "那年", "不要", "思念", "花开", "海边", "夏天",
            "沉默", "寂寞", "等待", "记得", "晚风", "阳光", "也许", "我们", "小雨", "回家", "告白", "日记")
LENGTH = 100
CONTEXT = 2
JUDGE_ORDER = 7
HAN = re.compile(r"[\u4e00-\u9fff]")
BLANKS = re.compile(r"\n\s*\n|\s{3,}")
STUTTER = re.compile(r"(\S)\1\1|(\S\S)\2")


def loop_rate(text: str, n: int = 4) -> float:
    """Share of the n-character sequences of `text` that already occurred earlier in it."""
    grams = [text[i:i + n] for i in range(len(text) - n + 1)]
    seen, repeated = set(), 0
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated / len(grams) if grams else 0.0


def copy_rate(text: str, corpus_runs: set[str], n: int = 8) -> float:
    """Share of the n-character runs of `text` that occur verbatim in the corpus."""
    runs = [text[i:i + n] for i in range(len(text) - n + 1)]
    return sum(r in corpus_runs for r in runs) / len(runs) if runs else 0.0


HOOK_LENGTH, HOOK_REPEATS = 6, 5


def hook_runs(train_text: str) -> set[str]:
    """The 6-character runs without blanks that the training text repeats HOOK_REPEATS times or more."""
    counts = Counter(train_text[i:i + HOOK_LENGTH] for i in range(len(train_text) - HOOK_LENGTH + 1))
    return {run for run, n in counts.items() if n >= HOOK_REPEATS and not any(c.isspace() for c in run)}


def has_hook(text: str, hooks: set[str]) -> bool:
    return any(text[i:i + HOOK_LENGTH] in hooks for i in range(len(text) - HOOK_LENGTH + 1))


def word_share(text: str) -> float:
    """Share of the Chinese characters of `text` that belong to multi-character words of jieba's
    dictionary (segmented line by line, HMM off, so every multi-character token is a dictionary word)."""
    in_words = total = 0
    for line in text.split("\n"):
        for token in jieba.lcut(line, HMM=False):
            han = len(HAN.findall(token))
            total += han
            if len(token) >= 2 and han == len(token) and jieba.dt.FREQ.get(token, 0) > 0:
                in_words += han
    return in_words / total if total else 0.0


def line_lengths(prefix: str, generated: str) -> list[int]:
    """Lengths of the complete lines of prefix + generated (the last, possibly cut, line left out)."""
    return [len(line.strip()) for line in (prefix + generated).split("\n")[:-1]]


def judge_perplexity(judge: KneserNey, ids: Sequence[int], start: int) -> float:
    return math.exp(-sum(judge.log_probs(ids, start)) / (len(ids) - start))


def measure(samples: list[tuple[str, str]], corpus_runs: set[str], hooks: set[str], judge: KneserNey,
            encode) -> dict:
    """The measures of (prefix, generated) pairs: means over answers, line lengths over all lines."""
    lines = [n for p, g in samples for n in line_lengths(p, g)]
    nll = chars = 0.0
    for p, g in samples:
        ids = encode(p + g)
        nll -= sum(judge.log_probs(ids, len(p)))
        chars += len(g)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    pooled = [g[i:i + 4] for _, g in samples for i in range(len(g) - 3)]
    return {"loops": mean([loop_rate(g) for _, g in samples]),
            "copied": mean([copy_rate(g, corpus_runs) for _, g in samples]),
            "hooks": mean([has_hook(g, hooks) for _, g in samples]),
            "words": mean([word_share(g) for _, g in samples]),
            "variety": len(set(pooled)) / len(pooled),
            "stutters": 100 * sum(len(STUTTER.findall(g)) for _, g in samples) / max(chars, 1),
            "line_mean": mean(lines) if lines else float("nan"),
            "lines_over_20": sum(n > 20 for n in lines) / len(lines) if lines else float("nan"),
            "blank_runs": mean([bool(BLANKS.search(g)) for _, g in samples]),
            "judge_ppl": math.exp(nll / chars),
            "chars": int(chars)}


def real_windows(text: str, count: int) -> list[tuple[str, str]]:
    """Non-overlapping (2-character context, next 100 characters) windows of real text."""
    size = CONTEXT + LENGTH
    return [(text[i:i + CONTEXT], text[i + CONTEXT:i + size]) for i in range(0, len(text) - size + 1, size)][:count]


def write_final_epoch(run: Path, out: Path) -> None:
    """A checkpoint of a training run's last epoch: the best checkpoint's vocabulary and settings with the
    weights of RUN.resume (written after every epoch)."""
    best = load_checkpoint(run)
    with safe_open(run.with_suffix(".resume"), framework="pt", device="cpu") as f:
        epoch = json.loads(f.metadata()["resume"])["epoch"]
        weights = {k.removeprefix("model."): f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
    best.model.load_state_dict(weights, strict=not best.config.tie_weights)
    training = {**best.training, "epochs": epoch, "best_epoch": epoch, "val_perplexity": None,
                "note": f"last epoch ({epoch}) of {run}, not the best"}
    save_checkpoint(out, best.model, best.vocab, best.newlines, training)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model_dir: Path, default_model: str | None):
    """A real `lyrics serve` on a free loopback port, stopped on exit; yields its base URL."""
    port = free_port()
    env = {**os.environ, "LYRICS_MODEL_DIR": str(model_dir), "LYRICS_PORT": str(port), "LYRICS_LOG_LEVEL": "warning"}
    if default_model:
        env["LYRICS_DEFAULT_MODEL"] = default_model
    server = subprocess.Popen([sys.executable, "-m", "lyrics_cli", "serve"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("lyrics serve did not become ready")
            time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


async def generate_all(url: str, prefixes: Sequence[str], fields: dict, clients: int = 8) -> list[dict]:
    """One request per prefix, `clients` at a time; a 503 (busy) is retried after its Retry-After."""
    limit = asyncio.Semaphore(clients)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def one(prefix):
            async with limit:
                while (r := await client.post("/generate", json={"prefix": prefix, "max_chars": LENGTH, **fields})
                       ).status_code == 503:
                    await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                r.raise_for_status()
                return r.json()
        return await asyncio.gather(*(one(p) for p in prefixes))


def parse_config(spec: str) -> tuple[str, dict]:
    label, _, fields = spec.partition("=")
    return label, json.loads(fields) if fields.strip() else {}


def fmt(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--model-dir", default=str(ROOT / "model_store" / "checkpoints"))
    ap.add_argument("--model", default=None, help="the model the requests name (default: the service's default)")
    ap.add_argument("--config", action="append", default=[], help="LABEL=JSON request fields (repeatable)")
    ap.add_argument("--final", action="append", default=[], metavar="NAME=RUN.safetensors",
                    help="also serve, as NAME, the last epoch of this training run (repeatable)")
    ap.add_argument("--samples", type=int, default=0, help="print the answers to the first N prefixes")
    ap.add_argument("--json", default=None, help="write every answer and measure here")
    args = ap.parse_args(argv)
    configs = [parse_config(c) for c in args.config] or [("default", {})]

    jieba.setLogLevel(60)
    jieba.initialize()
    corpus = load_corpus(args.corpus)
    train_text = corpus.vocab.decode(corpus.train_ids)
    val_text = corpus.vocab.decode(corpus.val_ids)
    corpus_runs = {corpus.text[i:i + 8] for i in range(len(corpus.text) - 7)}
    judge = KneserNey.fit(corpus.train_ids, JUDGE_ORDER, len(corpus.vocab))
    known = set(corpus.text)
    prefixes = [p for p in PREFIXES if set(p) <= known]
    if missing := [p for p in PREFIXES if p not in prefixes]:
        print(f"prefixes with characters outside the corpus, left out: {missing}", file=sys.stderr)

    # the real windows are in the corpus file, so their copies are looked up in the training part alone
    train_runs = {train_text[i:i + 8] for i in range(len(train_text) - 7)}
    windows = real_windows(val_text, 10_000)
    hooks = hook_runs(train_text)
    real = measure(windows, train_runs, hooks, judge, corpus.vocab.encode)
    rows, answers = [("real held-out lyrics", real)], {}
    model_dir = Path(args.model_dir)
    if args.final:  # serve the model directory's checkpoints and the final epochs side by side
        model_dir = Path(tempfile.mkdtemp(prefix="generation-quality-"))
        for path in Path(args.model_dir).glob("*.safetensors"):
            shutil.copy(path, model_dir / path.name)
        for spec in args.final:
            name, _, run = spec.partition("=")
            write_final_epoch(Path(run), model_dir / f"{name}.safetensors")
    with serving(model_dir, args.model) as url:
        for label, fields in configs:
            fields = {**fields, **({"model": args.model} if args.model and "model" not in fields else {})}
            t0 = time.perf_counter()
            out = asyncio.run(generate_all(url, prefixes, fields))
            seconds = time.perf_counter() - t0
            samples = [(p, o["generated"]) for p, o in zip(prefixes, out, strict=True)]
            result = measure(samples, corpus_runs, hooks, judge, corpus.vocab.encode)
            result["seconds"] = seconds
            rows.append((label, result))
            answers[label] = {"fields": fields, "answers": samples, "measures": result}

    print(f"\n{len(prefixes)} prefixes x {LENGTH} characters; real: {len(windows)} validation windows "
          f"(their copies looked up in the training part)\n")
    print("| configuration | loops (4-gram repeats) | copied (8-gram in corpus) | hooks | words (jieba) | variety | "
          "stutters / 100 chars | line mean | lines > 20 | blank runs | judge ppl | judge ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} | {fmt(r['loops'])} | {fmt(r['copied'])} | {fmt(r['hooks'])} | {fmt(r['words'])} | "
              f"{fmt(r['variety'])} | "
              f"{r['stutters']:.2f} | {r['line_mean']:.1f} | "
              f"{fmt(r['lines_over_20'])} | {fmt(r['blank_runs'])} | {r['judge_ppl']:.1f} | "
              f"{r['judge_ppl'] / real['judge_ppl']:.2f} |")
    for label, data in answers.items():
        if args.samples:
            print(f"\n{label} {json.dumps(data['fields'], ensure_ascii=False)}:")
            for p, g in data["answers"][:args.samples]:
                print(f"  {p}|{g!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({"real": real, "configs": answers}, ensure_ascii=False, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
