"""POST /compare: one prefix, the same settings and seed, through several models side by side.

Each model's generation goes to that model's own scheduler in the engine, so the models run
at the same time; the optional `text` is scored on the scoring pool meanwhile. Admission is
the engine's, as for /generate: a compare of k models counts k sequences (and k scoring calls).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass

from fastapi import APIRouter
from pydantic import ValidationError

from app.deps import EngineDep, MetricsDep, ModelsDep, SettingsDep
from app.engine import ENGINE_ERRORS, Engine, Job
from app.errors import ApiError, engine_error, invalid
from app.routes.generate import prepare_prefix
from app.routes.perplexity import scorable_text, score_fields
from app.schemas import BODY_ERRORS, CompareRequest, CompareResponse, CompareResult, ErrorBody, Provenance
from app.served import ServedModels
from model_store.checkpoint import Checkpoint
from model_store.continuation import Completion
from model_store.generate import Request
from model_store.registry import describe
from model_store.scoring import Score, score_text

router = APIRouter(tags=["compare"])

DOC = """Generate from `prefix` with every model in `models` (default: all loaded models), with the
same settings and the same seed, and answer each model's text side by side with its latency and
its training provenance (from its checkpoint: cell, sizes, epochs, validation perplexity, the
training command, the corpus's SHA-256).

With `text`, every model also scores that text (`score`: perplexity, cross-entropy, ...), so the
models are compared on the same characters. Without it nothing is scored: a model's perplexity
on its own output mostly reflects the sampling settings.

The models run concurrently, each in its own batch. `temperature` > 0 without `seed` draws one
seed for all of them, returned in `seed`. A character unknown to any model is a 422 naming the
model (or send `"unknown": "skip"`: each model drops what it cannot read)."""

ERRORS = {**BODY_ERRORS,
          404: {"model": ErrorBody, "description": "a model in `models` is not loaded (all such names are listed)"},
          422: {"model": ErrorBody, "description": "invalid field, limit exceeded, a model named twice, empty "
                                                   "prefix, short text or characters unknown to a model"},
          503: {"model": ErrorBody, "description": "busy (retry after Retry-After seconds) or not ready"},
          504: {"model": ErrorBody, "description": "a generation ran past LYRICS_REQUEST_TIMEOUT_S"}}


@dataclass
class Entry:
    """One model's share of the request: its prefix and text as it reads them."""

    ck: Checkpoint
    prefix: str
    skipped: int
    missing: list[str]
    text: str | None
    text_missing: list[str]


@router.post("/compare", response_model=CompareResponse, summary="Compare models on one prefix", description=DOC,
             responses=ERRORS)
async def compare(body: CompareRequest, models: ModelsDep, engine: EngineDep, settings: SettingsDep,
                  metrics: MetricsDep) -> CompareResponse:
    if errors := body.limit_errors(settings):
        raise invalid(errors)
    entries = prepare(chosen(models, body.models), body)
    params = body.sampling()
    seed = secrets.randbits(31) if params.temperature > 0 and body.seed is None else body.seed
    jobs: list[tuple[Job, float]] = []
    try:
        for e in entries:
            request = Request(e.prefix, body.max_chars, params, body.stop, seed)
            jobs.append((engine.submit(e.ck, request, stream=False), time.perf_counter()))
        async with asyncio.TaskGroup() as group:
            generated = [group.create_task(finished(job, start)) for job, start in jobs]
            scored = [group.create_task(score(engine, e, body.unknown)) for e in entries]
    except ENGINE_ERRORS as e:
        raise engine_error(e) from e
    except ExceptionGroup as group_error:  # the first failure; the group has cancelled the rest
        first = group_error.exceptions[0]
        raise (engine_error(first) if isinstance(first, ENGINE_ERRORS) else first) from group_error
    finally:
        for job, _ in jobs:  # a failure elsewhere stops the generations still running
            job.stop()
    results = []
    for entry, gen_task, score_task in zip(entries, generated, scored, strict=True):
        (completion, latency), (s, score_ms) = gen_task.result(), score_task.result()
        metrics.generated_chars.labels(entry.ck.name).inc(len(completion.generated))
        metrics.compare_latency.labels(entry.ck.name).observe(latency / 1000)
        if s is not None:
            metrics.scored_chars.labels(entry.ck.name).inc(s.chars_scored)
        results.append(CompareResult(
            model=entry.ck.name, prefix=entry.prefix, text=completion.text, generated=completion.generated,
            finish_reason=completion.finish_reason, latency_ms=latency,
            score=score_fields(s, entry.text_missing) if s is not None else None, score_ms=score_ms,
            unknown_skipped=entry.skipped,
            unknown_characters=entry.missing if entry.skipped else [], provenance=provenance(entry.ck)))
    return CompareResponse(prefix=body.prefix, seed=seed, text=body.text, results=results)


def chosen(models: ServedModels, names: list[str] | None) -> list[Checkpoint]:
    """The named models in order (default: all); one 404 naming every name that is not loaded."""
    if names is None:
        return list(models.models.values())
    unknown = [n if len(n) <= 80 else n[:80] + "..." for n in names if n not in models.models]
    if unknown:
        raise ApiError(404, "model_not_found", f"no model named {', '.join(map(repr, unknown))}; "
                                               f"loaded models: {', '.join(models.models)}")
    return [models.models[n] for n in names]


def prepare(cks: list[Checkpoint], body: CompareRequest) -> list[Entry]:
    """Each model's prefix and text; one 422 with every model's problems (unknown characters, short text)."""
    entries, errors = [], []
    for ck in cks:
        try:
            prefix, skipped, missing = prepare_prefix(ck, body)
        except ApiError as e:
            errors += [{**d, "model": ck.name} for d in e.details or []]
            prefix, skipped, missing = "", 0, []
        text, text_missing = None, list[str]()
        if body.text is not None:
            text, text_missing, error = scorable_text(ck, body.text, body.unknown, ["body", "text"])
            if error:
                errors.append({**error, "model": ck.name, "msg": f"{error['msg']} (model {ck.name!r})"})
        entries.append(Entry(ck, prefix, skipped, missing, text, text_missing))
    if errors:
        raise invalid(errors)
    return entries


async def finished(job: Job, start: float) -> tuple[Completion, float]:
    """The job's one completion and the milliseconds since it was submitted."""
    completions = await job.wait()
    return completions[0], (time.perf_counter() - start) * 1000


async def score(engine: Engine, entry: Entry, unknown: str) -> tuple[Score | None, float | None]:
    if entry.text is None:
        return None, None
    start = time.perf_counter()
    s = await engine.run(score_text, entry.ck.model, entry.ck.vocab, entry.text, unknown)
    return s, (time.perf_counter() - start) * 1000


def provenance(ck: Checkpoint) -> Provenance:
    """The model's description and training summary; a value of the wrong type in a checkpoint's own
    metadata becomes null rather than failing the request."""
    known = {**ck.training, **describe(ck)}
    values = {name: known.get(name) for name in Provenance.model_fields}
    try:
        return Provenance(**values)
    except ValidationError as e:
        odd = {error["loc"][0] for error in e.errors()}
        return Provenance(**{k: None if k in odd else v for k, v in values.items()})
