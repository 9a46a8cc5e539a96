"""GPU check: run where a CUDA device is present (no GPU is needed anywhere else).

Trains a small model on CUDA for a few epochs, generates on CUDA, checks that CUDA and
CPU logits agree within tolerance, that a CUDA-trained checkpoint loads on a CPU, and
that the scratch and fused implementations agree on CUDA, that the web service started
with LYRICS_DEVICE=cuda answers /generate and /perplexity as the CPU service does
(`check_app`), and that the continuous-batching engine on CUDA gives each of many concurrent
requests what it gets alone, with its throughput beside the CPU's (`check_engine`), and that
a mixture on CUDA scores as on the CPU, where it runs in C (`check_mixture`). Prints one JSON
summary; exits 1 on any failed check and 2 when no CUDA device is present.

    python scripts/gpu_check.py
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.engine import Engine  # noqa: E402
from app.main import create_app  # noqa: E402
from app.settings import Settings  # noqa: E402
from model_store.checkpoint import load_checkpoint  # noqa: E402
from model_store.generate import Request, generate  # noqa: E402
from model_store.mixture import MixtureConfig, MixtureLM  # noqa: E402
from model_store.ngram import KneserNey  # noqa: E402
from model_store.registry import BUNDLED_DIR, load_directory  # noqa: E402
from model_store.sampling import SamplingParams, decoding  # noqa: E402
from training.train import TrainConfig, train  # noqa: E402

TEXT = "窗外的燕子 在屋檐下唱歌\n你说这一句 像雨后的街道\n手中的铅笔 画着远方的船\n" * 40

APP_PREFIXES = ["窗外", "你说这一句", "手中的铅笔\n"]
APP_TEXTS = [TEXT[:200], "在屋檐下唱歌", "像雨后的街道\n手中的铅笔"]


async def post(client: httpx.AsyncClient, path: str, body: dict) -> dict:
    r = await client.post(path, json=body)
    if r.status_code != 200:
        raise RuntimeError(f"{path} answered {r.status_code}: {r.text[:300]}")
    return r.json()


async def app_answers(model_dir: Path, device: str) -> dict:
    """Start the app (lifespan included) on `device` and collect its answers for every model."""
    app = create_app(Settings(model_dir=model_dir, device=device, max_new_chars=200))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://gpu-check", timeout=120) as client:
        models = (await client.get("/models")).json()["models"]
        answers = {"devices": {m["name"]: m["device"] for m in models}}
        for m in models:
            name, common = m["name"], {"model": m["name"], "unknown": "skip"}
            answers[name] = {
                "greedy": [await post(client, "/generate", {"prefix": p, "max_chars": 100, "temperature": 0, **common})
                           for p in APP_PREFIXES],
                # the other decoding fields omitted: the lyric defaults (best_of candidates among them)
                "sampled": await post(client, "/generate", {"prefix": APP_PREFIXES[0], "n": 3, "max_chars": 60,
                                                            "temperature": 0.8, "seed": 7, **common}),
                "perplexity": await post(client, "/perplexity", {"text": APP_TEXTS, **common}),
            }
        return answers


def parting(ck, a: str, b: str) -> tuple[str, float]:
    """Where two greedy texts part: their common start, and the gap between the two likeliest next
    characters after it (a near-tie may flip on another device or in another batch)."""
    common = a[:next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))]
    with torch.no_grad():
        logits, _ = ck.model(torch.tensor([ck.vocab.encode(common)], device=ck.model.dense.weight.device))
    top = logits[0, -1].float().topk(2).values
    return common, float(top[0] - top[1])


def check_app(model_dir: Path, device: str = "cuda", reference: str = "cpu", rel_tol: float = 1e-4,
              tie: float = 1e-3) -> tuple[dict, list]:
    """The service on `device` against the service on `reference`: greedy text equal (unless it parts at
    a near-tie), perplexities within `rel_tol`, every model served on `device`. Sampled text is reported,
    not required to be equal (a uniform draw near a boundary may fall either way on another device)."""
    try:
        got, want = asyncio.run(app_answers(model_dir, device)), asyncio.run(app_answers(model_dir, reference))
    except Exception as e:  # reported as a failed check
        return {"error": repr(e)}, [f"app on {device}: {e!r}"]
    failures, summary = [], {}
    expected_device = "cuda:0" if device == "cuda" else str(torch.device(device))
    for name, served_on in got["devices"].items():
        if served_on != expected_device:
            failures.append(f"app {name}: served on {served_on}, expected {expected_device}")
        g, w = got[name], want[name]
        worst = max(abs(a["perplexity"] - b["perplexity"]) / b["perplexity"]
                    for a, b in zip(g["perplexity"]["results"], w["perplexity"]["results"], strict=True))
        summary[name] = {"device": served_on, "perplexity_max_rel_diff": worst, "greedy_equal": True,
                         "sampled_equal": [c["text"] for c in g["sampled"]["choices"]] ==
                                          [c["text"] for c in w["sampled"]["choices"]],
                         "sample": g["greedy"][0]["text"]}
        if not math.isfinite(worst) or worst > rel_tol:
            failures.append(f"app {name}: /perplexity on {device} differs from {reference} by {worst:.2e}")
        for a, b in zip(g["greedy"], w["greedy"], strict=True):
            if a["text"] == b["text"]:
                continue
            summary[name]["greedy_equal"] = False
            common, gap = parting(load_checkpoint(model_dir / f"{name}.safetensors"), a["text"], b["text"])
            summary[name]["greedy_parts_at_gap"] = gap
            if gap > tie:
                failures.append(f"app {name}: greedy /generate on {device} differs from {reference} after "
                                f"{common!r} (top-2 logit gap {gap:.2e}, not a tie)")
    return summary, failures


async def run_engine(ck, requests: list[Request]) -> tuple[list[list[str]], float]:
    """Every request submitted at once to one engine: their texts and the wall time."""
    engine = Engine(max_batch=64, max_queue=sum(r.row_count for r in requests))  # rows, best_of candidates too
    engine.start()
    try:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(engine.complete(ck, r) for r in requests))
        return [[c.text for c in r] for r in results], time.perf_counter() - t0
    finally:
        engine.stop()


def check_engine(path: Path, device: str = "cuda") -> tuple[dict, list]:
    """Mixed concurrent requests on `device`, each against the same request alone on `device`: greedy text
    equal unless it parts at a near-tie; then 64 concurrent 200-character greedy requests, on `device`
    and on the CPU, for characters per second through the engine (no HTTP)."""
    summary, failures = {}, []
    ck = load_checkpoint(path, device=device, pack=True)
    prefixes = [p for p in ["窗外", "你说这一句", "手中的铅笔\n", "像", "在屋檐下唱歌", "分开", "我"]
                if not ck.vocab.unknown(p)][:5]
    requests = [Request(prefixes[i % len(prefixes)], 20 + 13 * i,
                        SamplingParams() if i % 2 else decoding(temperature=0.8, top_p=0.9),  # best_of 8
                        seed=i, n=1 + i % 3) for i in range(24)]
    together, _ = asyncio.run(run_engine(ck, requests))
    alone = [[c.text for c in generate(ck.model, ck.vocab, r.prefix, r.max_chars, r.params, seed=r.seed, n=r.n)]
             for r in requests]
    greedy_unequal = sampled_unequal = 0
    for g, a, b in zip(requests, together, alone, strict=True):
        if a == b:
            continue
        if g.params.temperature > 0:
            sampled_unequal += 1
            continue
        greedy_unequal += 1
        common, gap = parting(ck, *next((x, y) for x, y in zip(a, b, strict=True) if x != y))
        if gap > 1e-3:
            failures.append(f"engine on {device}: a batched greedy request differs from the same request alone "
                            f"after {common!r} (top-2 logit gap {gap:.2e}, not a tie)")
    summary.update(requests=len(requests), greedy_unequal=greedy_unequal, sampled_unequal=sampled_unequal)
    for dev in (device, "cpu"):
        model = ck if dev == device else load_checkpoint(path, device="cpu", pack=True)
        load = [Request(prefixes[i % len(prefixes)], 200) for i in range(64)]
        asyncio.run(run_engine(model, load[:8]))  # warm-up
        texts, seconds = asyncio.run(run_engine(model, load))
        summary[f"chars_per_s_c64_{dev}"] = round(sum(len(t) for r in texts for t in r) / seconds)
    return summary, failures


def check_mixture(path: Path, device: str = "cuda", tol: float = 1e-3) -> tuple[dict, list]:
    """A mixture (the checkpoint's model, an n-gram of TEXT and a cache) on `device` against the CPU, where
    its cache, n-gram and mixing run in C: the log-probabilities of TEXT agree within `tol`."""
    ck = load_checkpoint(path)
    ids = ck.vocab.encode(TEXT[:400])
    config = MixtureConfig(weights=tuple((0.5 - 0.1 * k, 0.3, 0.2 + 0.1 * k) for k in range(5)), cache_order=4,
                           cache_window=64)
    mixture = MixtureLM(ck.model, KneserNey.fit(ids, 4, len(ck.vocab)), config).eval()
    with torch.no_grad():
        on_cpu = mixture(torch.tensor([ids]))[0]
        on_device = mixture.to(device)(torch.tensor([ids], device=device))[0].cpu()
    diff = (on_device - on_cpu).abs().max().item()
    failures = [] if diff <= tol else [f"mixture on {device}: log-probabilities differ from the CPU by {diff:.2e}"]
    return {"max_abs_log_prob_diff_vs_cpu": diff}, failures


def main() -> int:
    if not torch.cuda.is_available():
        print(json.dumps({"ok": False, "reason": "no CUDA device"}))
        return 2
    checks: dict[str, object] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(TEXT, encoding="utf-8")
        for cell in ("rnn", "gru", "lstm"):
            out = Path(tmp) / f"{cell}.safetensors"
            t0 = time.perf_counter()
            result = train(TrainConfig(corpus=str(corpus), cell=cell, out=str(out), hidden_size=64, embed_size=32,
                                       num_layers=2, epochs=8, batch_size=8, num_steps=20, lr=1e-2, device="cuda",
                                       progress=False, sample_every=0), log=lambda _: None)
            gpu = load_checkpoint(out, device="cuda")
            cpu = load_checkpoint(out, device="cpu")
            ids = torch.tensor([gpu.vocab.encode(TEXT[:300])])
            with torch.no_grad():
                logits_gpu = gpu.model(ids.cuda())[0].cpu()
                logits_cpu = cpu.model(ids)[0]
                gpu.model.impl = "scratch"
                logits_scratch = gpu.model(ids.cuda())[0].cpu()
            diff = (logits_gpu - logits_cpu).abs().max().item()
            impl_diff = (logits_gpu - logits_scratch).abs().max().item()
            text_gpu = generate(gpu.model, gpu.vocab, "窗外", 40)[0].text
            text_cpu = generate(cpu.model, cpu.vocab, "窗外", 40)[0].text
            checks[cell] = {"train_seconds": round(time.perf_counter() - t0, 2),
                            "train_perplexity": result.final_train_perplexity,
                            "val_perplexity": result.best_val_perplexity,
                            "max_abs_logit_diff_cuda_vs_cpu": diff, "max_abs_logit_diff_fused_vs_scratch": impl_diff,
                            "greedy_cuda_equals_cpu": text_gpu == text_cpu, "sample": text_gpu}
            if diff > 1e-3 or impl_diff > 1e-3:
                failures.append(f"{cell}: logits differ (cuda vs cpu {diff:.2e}, fused vs scratch {impl_diff:.2e})")
            if result.final_train_perplexity > 20:
                failures.append(f"{cell}: did not learn (train perplexity {result.final_train_perplexity:.1f})")
        checks["mixture"], mixture_failures = check_mixture(Path(tmp) / "lstm.safetensors")
        failures += mixture_failures
        checks["app"], app_failures = check_app(Path(tmp))
        failures += app_failures
    bundled = load_directory(BUNDLED_DIR, device="cuda")
    if bundled.models:
        ck = bundled.models[bundled.default]
        checks["bundled_default"] = {"name": ck.name, "sample": generate(ck.model, ck.vocab, "分开", 30)[0].text}
        checks["app_bundled"], app_failures = check_app(BUNDLED_DIR)
        failures += app_failures
        checks["engine_bundled"], engine_failures = check_engine(BUNDLED_DIR / f"{ck.name}.safetensors")
        failures += engine_failures
    checks["failures"] = failures
    checks["ok"] = not failures
    print(json.dumps(checks, ensure_ascii=False, indent=2))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
