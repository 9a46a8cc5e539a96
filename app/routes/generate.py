"""POST /generate: continue a prefix, as one JSON answer or as server-sent events."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.deps import EngineDep, MetricsDep, ModelsDep, SettingsDep, StateCodecDep
from app.engine import ENGINE_ERRORS, Engine, Job
from app.errors import ApiError, engine_error, error_body, invalid
from app.inputs import drop_unknown, model_text, unknown_error
from app.metrics import Metrics
from app.schemas import BODY_ERRORS, Choice, ContinueFields, ErrorBody, GenerateRequest, GenerateResponse, GenerateUsage
from app.served import ServedModels
from app.settings import Settings
from model_store.checkpoint import Checkpoint
from model_store.constraints import ConstraintError, Constraints, parse_line_lengths, structure_chars
from model_store.continuation import CharLogprob, Completion
from model_store.generate import Request
from model_store.state import Snapshot, StateCodec, StateError, model_identity

log = logging.getLogger("app.generate")
router = APIRouter(tags=["generate"])

STREAM_DOC = """Continue `prefix` with up to `max_chars` characters, `n` times.

By default the text is sampled with the lyric defaults (see the fields); pass `seed` to
make it reproducible. `temperature` 0 is greedy: the same prefix always gives the same text.
`logprobs` adds each generated character's log-probability and the likeliest alternatives.

**Streaming** (`"stream": true`) answers `text/event-stream`, one event per generated chunk:

    data: {"index": 0, "text": "的"}

(with `logprobs`, the chunk also carries its characters' `logprobs`), then one `final`
event whose data is the whole answer, as without streaming (choices
with `finish_reason`, `usage`), then the end marker:

    event: final
    data: {"model": "gru", "prefix": "分开", "text": "...", "choices": [...], "usage": {...}, ...}

    data: [DONE]

A problem after the stream has started (the request deadline) is sent as
`event: error` with the usual error object, then `data: [DONE]`. A client that
disconnects stops its generation.

**Continuing a song**: with `"return_state": true` the answer carries `state`, a signed
handle on the model's state after the text. Send it back as `state` with a new `prefix`
(which may be empty) and the model continues exactly as if it had read the whole text again.

**Structure**: `constraints` fixes lines, characters per line, banned and required
characters and a rhyme by masking the vocabulary at each step; `constraints_met` says,
per choice, whether each was met.
"""

# Open API 3.1 reads an event stream's `schema` as the schema of each event, not of the whole body.
SSE_EVENT = {"type": "object", "required": ["data"], "description": "one server-sent event (see above)",
             "properties": {"event": {"type": "string", "enum": ["message", "final", "error"],
                                      "description": "absent (message): a chunk, or the end marker"},
                            "data": {"type": "string", "description": "JSON: a chunk {index, text}, the final answer "
                                                                      "or an error object; '[DONE]' at the end"}}}

ERRORS = {**BODY_ERRORS,
          404: {"model": ErrorBody, "description": "unknown model"},
          422: {"model": ErrorBody, "description": "invalid field, limit exceeded, empty prefix, unknown characters, "
                                                   "impossible constraints, or an altered, expired or other model's state"},
          503: {"model": ErrorBody, "description": "busy (retry after Retry-After seconds) or not ready"},
          504: {"model": ErrorBody, "description": "the generation ran past LYRICS_REQUEST_TIMEOUT_S"}}


@router.post("/generate", response_model=GenerateResponse, summary="Generate lyrics", description=STREAM_DOC,
             responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}}, **ERRORS})
async def generate(body: GenerateRequest, models: ModelsDep, engine: EngineDep, settings: SettingsDep,
                   metrics: MetricsDep, codec: StateCodecDep):
    run = start(body, models, engine, settings, codec)
    if body.stream:
        return StreamingResponse(events(run, metrics), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    completions = await finished(run.job)
    metrics.generated_chars.labels(run.ck.name).inc(sum(len(c.generated) for c in completions))
    return answer(run, completions)


@dataclass
class Started:
    """A generation handed to the engine, and what its answer needs."""

    job: Job
    ck: Checkpoint
    prefix: str  # as the model read it
    skipped: int  # unknown characters dropped from it
    missing: list[str]  # which
    seal: Callable[[Snapshot], str] | None  # turns a snapshot into a state handle, with return_state


def start(body: GenerateRequest, models: ServedModels, engine: Engine, settings: Settings,
          codec: StateCodec | None = None) -> Started:
    """Check a request against the limits, read its prefix, state and constraints, and submit it
    (/generate and /v1/completions both start here). Raises ApiError for what is wrong."""
    max_chars_given = "max_chars" in body.model_fields_set  # before limit_errors fills it in
    if errors := body.limit_errors(settings):
        raise invalid(errors)
    ck, start_from = open_state(body, models, codec)
    prefix, skipped, missing = prepare_prefix(ck, body)
    constraints = read_constraints(body, settings, max_chars_given)
    request = Request(prefix, body.max_chars, body.sampling(), body.stop, body.seed, body.n, start=start_from,
                      keep_state=body.return_state, constraints=constraints, logprobs=body.logprobs)
    seal = sealer(codec, ck) if body.return_state and codec is not None else None
    try:
        job = engine.submit(ck, request, stream=body.stream)
    except ConstraintError as e:
        raise constraint_error(e) from e
    except ENGINE_ERRORS as e:
        raise engine_error(e) from e
    return Started(job, ck, prefix, skipped, missing, seal)


async def finished(job: Job) -> list[Completion]:
    """The job's completions once it is done; its timeout or cancellation as an ApiError."""
    try:
        return await job.wait()
    except ENGINE_ERRORS as e:
        raise engine_error(e) from e


def open_state(body: GenerateRequest, models: ServedModels,
               codec: StateCodec | None) -> tuple[Checkpoint, Snapshot | None]:
    """The model to run, and the snapshot to start from when the request continues a state handle."""
    if body.state is None or codec is None:
        return models.get(body.model), None
    try:
        opened = codec.open(body.state)
        ck = models.get(body.model if body.model is not None else opened.model)
        return ck, opened.snapshot(ck.name, ck.model, ck.vocab)
    except StateError as e:
        raise invalid([{"loc": ["body", "state"], "msg": str(e), "type": f"state_{e.kind}"}]) from e


def sealer(codec: StateCodec, ck: Checkpoint) -> Callable[[Snapshot], str]:
    identity = model_identity(ck.name, ck.model, ck.vocab)
    return lambda snapshot: codec.encode(snapshot, identity)


def read_constraints(body: GenerateRequest, settings: Settings, max_chars_given: bool) -> Constraints | None:
    """The request's constraints; an omitted max_chars becomes what a fixed line structure takes."""
    if body.constraints is None:
        return None
    c = body.constraints
    constraints = Constraints(c.lines, c.line_lengths, c.banned, c.required, c.rhyme)
    try:
        needed = structure_chars(c.lines, parse_line_lengths(c.line_lengths))
    except ConstraintError as e:
        raise constraint_error(e) from e
    if needed is not None and not max_chars_given:
        if needed > settings.max_new_chars:
            raise constraint_error(ConstraintError("lines", f"the line structure needs {needed} characters; the "
                                                            f"limit is {settings.max_new_chars}"))
        body.max_chars = needed
    return constraints


def constraint_error(e: ConstraintError) -> ApiError:
    return invalid([{"loc": ["body", "constraints", e.field], "msg": str(e), "type": "impossible_constraints"}])


def prepare_prefix(ck: Checkpoint, body: ContinueFields) -> tuple[str, int, list[str]]:
    prefix = model_text(ck, body.prefix)
    missing = ck.vocab.unknown(prefix)
    skipped = 0
    if missing:
        if body.unknown == "error":
            raise invalid([unknown_error(ck, missing, ["body", "prefix"])])
        prefix, skipped = drop_unknown(ck, prefix)
        if not prefix and not body.continues_a_text():
            raise invalid([{"loc": ["body", "prefix"], "type": "empty_prefix",
                            "msg": "no character of the prefix is in the model's vocabulary: nothing to continue"}])
    return prefix, skipped, missing


def answer(run: Started, completions: list[Completion]) -> GenerateResponse:
    ck, seal = run.ck, run.seal
    choices = [Choice(index=i, text=c.text, generated=c.generated, finish_reason=c.finish_reason, seed=c.seed,
                      state=seal(c.state) if seal and c.state is not None else None, constraints_met=c.constraints_met,
                      logprobs=logprobs_json(ck, c.logprobs))
               for i, c in enumerate(completions)]
    first = choices[0]
    return GenerateResponse(model=ck.name, prefix=run.prefix, text=first.text, generated=first.generated,
                            finish_reason=first.finish_reason, seed=first.seed, choices=choices,
                            state=first.state, constraints_met=first.constraints_met,
                            usage=GenerateUsage(prompt_chars=len(run.prefix),
                                                generated_chars=sum(len(c.generated) for c in choices)),
                            unknown_skipped=run.skipped, unknown_characters=run.missing if run.skipped else [])


def logprobs_json(ck: Checkpoint, records: list[CharLogprob] | None) -> list[dict] | None:
    """Generated characters' log-probabilities as the answer shows them: characters, not ids."""
    if records is None:
        return None
    chars = ck.vocab.idx_to_char
    return [{"char": chars[r.id], "logprob": r.logprob, "top": [{"char": chars[i], "logprob": v} for i, v in r.top]}
            for r in records]


def sse(data, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


async def events(run: Started, metrics: Metrics) -> AsyncIterator[str]:
    deltas = aiter(run.job)
    try:
        async for delta in deltas:
            metrics.generated_chars.labels(run.ck.name).inc(len(delta.text))
            chunk = {"index": delta.index, "text": delta.text}
            if delta.logprobs is not None:
                chunk["logprobs"] = logprobs_json(run.ck, delta.logprobs)
            yield sse(chunk)
        yield sse(answer(run, run.job.completions).model_dump(), event="final")
    except Exception as e:  # after the answer has started: the error goes in the stream
        error = engine_error(e)
        yield sse(error_body(error.type, error.message), event="error")
    finally:
        await deltas.aclose()
        run.job.stop()
    yield sse("[DONE]")
