"""`lyrics poetry-corpus`: pretraining text from the npm package `chinese-poetry`, shaped like lyrics.

57k characters of lyrics is very little Chinese; the package ships Song ci (词, lyrics written
to tunes) and Yuan qu (曲, sung verse) in simplified characters, MIT-licensed. Fetch it with
`npm pack chinese-poetry@2.0.1`, then this command reads the archive as it is (nothing is
installed or committed) and writes one text file for `lyrics train`:

* stage directions and notes in brackets, such as `（正末唱）`, are dropped;
* a sentence (up to 。？！；) becomes a line and its clauses (，、：) are separated by a space,
  which is how the lyric corpus lays out its lines; other punctuation is dropped;
* only lines whose every character is in the kept set survive: the characters of the lyric
  corpus's training part (`--vocab-from`, split as `lyrics train` splits it, so the validation
  text is never read) plus the `--extra-chars` most frequent others. That bounds the output
  layer while pretraining; fine-tuning (`lyrics train --init-from`) keeps the lyric vocabulary.

Beside the text, `OUT.source.json` records the command, the archive's sha256 and the counts;
`lyrics train` copies it into the checkpoint's metadata, so a model's whole recipe is in it.
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from model_store.checkpoint import atomic_write_bytes
from training.corpus import CorpusError, load_corpus

PARTS = {"songci": re.compile(r"package/dist/songci/ci\.song\.\d+\.json"),
         "yuanqu": re.compile(r"package/dist/yuanqu/[^/]+\.json")}
BRACKETED = re.compile(r"（[^）]*）|\([^)]*\)|【[^】]*】|〖[^〗]*〗|\[[^\]]*\]")
SENTENCE_END = re.compile(r"[。？！；?!;]+")
CLAUSE_BREAK = re.compile(r"[，、：,:\s]+")
DROPPED = re.compile(r"[“”\"‘’'「」『』《》〈〉・·•\-—–…～~()（）]")


def poems(package: str | Path, parts: list[str]) -> Iterator[list[str]]:
    """Each poem's `paragraphs`, from the archive's JSON files of `parts`, in sorted file order."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise CorpusError(f"unknown parts {unknown}: choose from {sorted(PARTS)}")
    try:
        archive = tarfile.open(package, "r:gz")
    except (OSError, tarfile.TarError) as e:
        raise CorpusError(f"cannot read {package} as the npm archive of chinese-poetry: {e}") from e
    with archive:
        members = sorted((m for m in archive.getmembers() if any(PARTS[p].fullmatch(m.name) for p in parts)),
                         key=lambda m: m.name)
        if not members:
            raise CorpusError(f"{package} holds no JSON file of {parts}: is it `npm pack chinese-poetry`'s archive?")
        for member in members:
            file = archive.extractfile(member)
            if file is None:  # a directory or a link: no poems
                continue
            for poem in json.load(file):
                yield poem.get("paragraphs") or []


def lyric_lines(paragraphs: list[str]) -> list[str]:
    """One poem as lines laid out like the lyric corpus: a line per sentence, clauses spaced."""
    text = BRACKETED.sub("", "".join(paragraphs))
    lines = []
    for sentence in SENTENCE_END.split(text):
        line = CLAUSE_BREAK.sub(" ", DROPPED.sub("", sentence)).strip()
        if line:
            lines.append(line)
    return lines


def build(package: str | Path, out: str | Path, vocab_from: str | Path, extra_chars: int = 1000,
          parts: list[str] | None = None, val_frac: float = 0.1, command: str = "") -> dict:
    """Write the pretraining text and its source record; returns the record."""
    parts = parts or sorted(PARTS)
    lyrics = load_corpus(vocab_from, "keep", val_frac)
    lyric_chars = {lyrics.vocab.idx_to_char[i] for i in set(lyrics.train_ids)}
    poem_lines = [lyric_lines(p) for p in poems(package, parts)]
    counts = Counter(c for lines in poem_lines for line in lines for c in line if c not in lyric_chars)
    extra = [c for c, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:extra_chars]]
    kept_chars = lyric_chars | set(extra)
    kept, total = [], 0
    for lines in poem_lines:
        total += len(lines)
        kept += [line for line in lines if kept_chars.issuperset(line)]
    if not kept:
        raise CorpusError("no line of the poems survived the character filter")
    text = "\n".join(kept) + "\n"
    atomic_write_bytes(out, text.encode("utf-8"))
    record = {"command": command, "package": Path(package).name,
              "package_sha256": hashlib.sha256(Path(package).read_bytes()).hexdigest(), "parts": parts,
              "vocab_from_sha256": lyrics.sha256, "extra_chars": extra_chars, "lines_read": total,
              "lines_kept": len(kept), "chars": len(text), "distinct_chars": len(set(text)),
              "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    atomic_write_bytes(source_record_path(out), json.dumps(record, ensure_ascii=False, indent=1).encode("utf-8"))
    return record


def source_record_path(corpus: str | Path) -> Path:
    return Path(f"{corpus}.source.json")


def source_record(corpus: str | Path) -> dict | None:
    """The record `build` wrote beside a corpus, if it is there."""
    try:
        return json.loads(source_record_path(corpus).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
