"""The OpenAI-compatible API: POST /v1/completions and GET /v1/models.

A client written for OpenAI's (legacy) completions API, such as the `openai` package,
LangChain, LiteLLM or a load generator, talks to the service unchanged. **A token is one
character.** A completion request becomes one /generate request per prompt
(`routes.generate.start`), so the decoding, limits, batching and errors are the same;
what differs is the shape: `prompt`/`max_tokens`, `choices[].text` holding the completion
alone (the prompt too with `echo`), `usage` in tokens, OpenAI's `logprobs` object and error
body (app/errors.py). Omitted decoding fields take the service's lyric defaults, as on
/generate; `max_tokens` defaults to OpenAI's 16.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from app.deps import EngineDep, MetricsDep, ModelsDep, SettingsDep
from app.engine import Engine
from app.errors import ApiError, clean_validation_errors, engine_error, invalid, openai_error
from app.metrics import Metrics
from app.routes.generate import Started, finished, sse, start
from app.schemas import MAX_LOGPROBS, MAX_SEED, Constraints, GenerateRequest, StrictBody
from app.settings import Settings
from model_store.checkpoint import Checkpoint
from model_store.continuation import CharLogprob, Completion
from model_store.generate import text_logprobs

router = APIRouter(prefix="/v1", tags=["openai"])

OWNER = "lyrics-rnn"
UNSUPPORTED = {"frequency_penalty": "only 0 is supported; use repetition_penalty or no_repeat_ngram",
               "presence_penalty": "only 0 is supported; use repetition_penalty or no_repeat_ngram",
               "logit_bias": "logit_bias is not supported; use constraints.banned",
               "suffix": "suffix is not supported: the models only continue a text"}
# our field names, as this API calls them (for the `param` of an error)
PARAM = {"prefix": "prompt", "max_chars": "max_tokens"}
OPENAI_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
    "code": {"type": ["string", "null"]}}}}}
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"description": text, "content": {"application/json": {"schema": OPENAI_ERROR}}}
    for status, text in ((400, "invalid field, limit exceeded, unknown characters, unsupported option"),
                         (401, "missing or invalid API key"), (404, "unknown model"),
                         (429, "the queue is full: retry after Retry-After seconds"),
                         (504, "the generation ran past LYRICS_REQUEST_TIMEOUT_S"))}


class StreamOptions(StrictBody):
    include_usage: bool = Field(False, description="send a last chunk with `usage` and no choices")


class CompletionRequest(StrictBody):
    """OpenAI's completion request, a token being one character, plus the service's own decoding fields."""

    model: str | None = Field(None, max_length=200, examples=["lstm"],
                              description="an id from GET /v1/models; omitted: the service's default model")
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1000)] = Field(
        examples=["分开"], description="the text to continue, or a list of texts (each its own `n` choices)")
    max_tokens: int | None = Field(16, ge=0, le=1_000_000, description=(
        "characters to generate at most (a token is one character), up to LYRICS_MAX_NEW_CHARS; null: that limit"))
    temperature: float | None = Field(None, ge=0.0, le=100.0, description=(
        "0: greedy; omitted: the lyric defaults of /generate (0.9, with top_p 0.95, no repeated 4-grams, no "
        "blank runs, best of 8)"))
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1000, description="choices per prompt (up to LYRICS_MAX_N)")
    stop: str | Annotated[list[str], Field(max_length=1000)] | None = Field(
        None, description="a string or a list: generation stops before it")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="choice i of a prompt uses seed + i")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=(
        "each character's log-probability and the `logprobs` likeliest characters at its place (the model's own "
        "numbers, before temperature and filters; /perplexity's for a plain model)"))
    echo: bool = Field(False, description="the prompt is repeated before the completion (and in logprobs)")
    best_of: int | None = Field(None, ge=1, le=64, description=(
        "the service's best_of (see /generate): candidates compared every best_of_chars characters"))
    user: str | None = Field(None, max_length=256, description="accepted and ignored")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="only 0 (see repetition_penalty)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="only 0 (see repetition_penalty)")
    logit_bias: dict[str, float] | None = Field(None, description="only empty (see constraints.banned)")
    suffix: str | None = Field(None, description="only null: the models continue, they do not fill in")
    # the service's own fields, as extensions
    top_k: int = Field(0, ge=0, le=1_000_000)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    no_repeat_ngram: int | None = Field(None, ge=0, le=1000)
    no_blank_runs: bool | None = None
    max_char_run: int | None = Field(None, ge=0, le=1000)
    min_line_chars: int | None = Field(None, ge=0, le=1000)
    best_of_chars: int | None = Field(None, ge=1, le=1_000_000)
    constraints: Constraints | None = None
    unknown: Literal["error", "skip"] = "error"

    @field_validator("frequency_penalty", "presence_penalty", "logit_bias", "suffix")
    @classmethod
    def unsupported(cls, value, info: ValidationInfo):
        """OpenAI options without a meaning here: accepted at their neutral value (clients send them), else 400."""
        if value:
            raise PydanticCustomError("unsupported", UNSUPPORTED[str(info.field_name)])
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    def generate_request(self, prompt: str, settings: Settings) -> GenerateRequest:
        """The /generate request that makes one prompt's choices."""
        fields = {"prefix": prompt, "model": self.model, "temperature": self.temperature, "top_p": self.top_p,
                  "n": self.n, "stop": [self.stop] if isinstance(self.stop, str) else self.stop or [],
                  "stream": self.stream, "seed": self.seed, "logprobs": self.logprobs, "best_of": self.best_of,
                  "top_k": self.top_k, "repetition_penalty": self.repetition_penalty,
                  "no_repeat_ngram": self.no_repeat_ngram, "no_blank_runs": self.no_blank_runs,
                  "max_char_run": self.max_char_run, "min_line_chars": self.min_line_chars,
                  "best_of_chars": self.best_of_chars, "constraints": self.constraints, "unknown": self.unknown}
        if self.max_tokens is not None:
            fields["max_chars"] = self.max_tokens
        try:
            return GenerateRequest(**{k: v for k, v in fields.items() if v is not None or k == "model"})
        except ValidationError as e:
            raise invalid(clean_validation_errors(list(e.errors()))) from e


def renamed(details: list[dict]) -> list[dict]:
    """Field errors of the /generate request, named as this API names the fields."""
    return [{**d, "loc": [PARAM.get(p, p) if isinstance(p, str) else p for p in d["loc"]],
             "msg": d["msg"].replace("max_chars", "max_tokens").replace("prefix", "prompt")} for d in details]


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="null for the first character of an echoed prompt")
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int] = Field(description="each character's offset from the start of the prompt")


class CompletionChoice(BaseModel):
    text: str
    index: int = Field(description="prompt p's choice i is index p * n + i")
    logprobs: Logprobs | None = None
    finish_reason: Literal["length", "stop"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelCards(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


COMPLETIONS_DOC = """OpenAI's completions API: a token is one character. With `stream`, server-sent
events carry chunks of the answer's shape (`choices[0]` with its `index` and new `text`, and
`finish_reason` in the chunk that ends it), then `data: [DONE]`; an error after the stream has
begun is sent as `data: {"error": {...}}`. Errors are `{"error": {"message", "type", "param", "code"}}`."""


@router.post("/completions", response_model=CompletionResponse, response_model_exclude_none=False,
             summary="Complete prompts (OpenAI-compatible)", description=COMPLETIONS_DOC,
             responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
async def completions(body: CompletionRequest, models: ModelsDep, engine: EngineDep, settings: SettingsDep,
                      metrics: MetricsDep):
    if len(body.prompts) > settings.max_texts:
        raise invalid([{"loc": ["body", "prompt"], "type": "limit_exceeded",
                        "msg": f"at most {settings.max_texts} prompts per request (LYRICS_MAX_TEXTS)"}])
    runs: list[Started] = []
    try:
        for prompt in body.prompts:
            runs.append(start(body.generate_request(prompt, settings), models, engine, settings))
    except ApiError as e:
        for run in runs:
            run.job.stop()
        if e.details:  # a field problem, named as /generate names its fields
            raise invalid(renamed(e.details)) from e
        raise
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": runs[0].ck.name}
    echoes = [await prompt_logprobs(engine, run, body) for run in runs]
    if body.stream:
        return StreamingResponse(stream(runs, echoes, body, head, metrics), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        done = [await finished(run.job) for run in runs]
    finally:
        for run in runs:
            run.job.stop()
    metrics.generated_chars.labels(runs[0].ck.name).inc(sum(len(c.generated) for cs in done for c in cs))
    choices = [choice(run, c, p * body.n + i, body, echo) for p, (run, cs, echo) in
               enumerate(zip(runs, done, echoes, strict=True)) for i, c in enumerate(cs)]
    return CompletionResponse(**head, choices=choices, usage=usage(runs, done))


async def prompt_logprobs(engine: Engine, run: Started, body: CompletionRequest) -> list[CharLogprob] | None:
    """With echo and logprobs: the prompt's characters scored, as the generated ones are (on the scoring pool)."""
    if not (body.echo and body.logprobs is not None):
        return None
    ids = run.ck.vocab.encode(run.prefix)
    return await engine.run(text_logprobs, run.ck.model, ids, body.logprobs)


def logprobs_object(ck: Checkpoint, records: list[CharLogprob], offset: int,
                    echoed: list[CharLogprob] | None = None, prompt: str = "") -> Logprobs:
    """OpenAI's logprobs: tokens, their log-probabilities, the top alternatives and offsets from the prompt's
    start. With `echoed` (the prompt's characters after its first) the prompt comes first, its first null."""
    chars = ck.vocab.idx_to_char
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    if echoed is not None and prompt:
        tokens, values, tops, offsets = [prompt[0]], [None], [None], [0]
        records = echoed + records
        offset = 1
    for i, r in enumerate(records):
        tokens.append(chars[r.id])
        values.append(r.logprob)
        tops.append({chars[c]: v for c, v in r.top})
        offsets.append(offset + i)
    return Logprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)


def choice(run: Started, c: Completion, index: int, body: CompletionRequest,
           echoed: list[CharLogprob] | None) -> CompletionChoice:
    logprobs = None
    if c.logprobs is not None:
        logprobs = logprobs_object(run.ck, c.logprobs, len(run.prefix), echoed, run.prefix)
    return CompletionChoice(text=(run.prefix if body.echo else "") + c.generated, index=index, logprobs=logprobs,
                            finish_reason=c.finish_reason)


def usage(runs: list[Started], done: list[list[Completion]]) -> Usage:
    prompt = sum(len(run.prefix) for run in runs)
    completion = sum(len(c.generated) for cs in done for c in cs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def stream(runs: list[Started], echoes: list, body: CompletionRequest, head: dict,
                 metrics: Metrics) -> AsyncIterator[str]:
    """Every prompt's chunks as they come (the prompts run side by side), each choice's last with its
    finish_reason; then usage if asked, then [DONE]."""
    queue: asyncio.Queue = asyncio.Queue()
    offsets = [[0] * body.n for _ in runs]  # characters streamed so far, per prompt and choice

    def chunk(index: int, text: str, logprobs: Logprobs | None, finish: str | None) -> str:
        part = CompletionChoice(text=text, index=index, logprobs=logprobs, finish_reason=finish)
        return sse({**head, "object": "text_completion", "choices": [part.model_dump()]})

    async def follow(p: int, run: Started) -> None:
        try:
            if body.echo:  # the prompt first, once per choice
                for i in range(body.n):
                    echoed = logprobs_object(run.ck, [], 0, echoes[p], run.prefix) if echoes[p] is not None else None
                    await queue.put(chunk(p * body.n + i, run.prefix, echoed, None))
            async for delta in run.job:
                metrics.generated_chars.labels(run.ck.name).inc(len(delta.text))
                logprobs = None
                if delta.logprobs is not None:  # offsets from the prompt's start
                    logprobs = logprobs_object(run.ck, delta.logprobs, len(run.prefix) + offsets[p][delta.index])
                offsets[p][delta.index] += len(delta.text)
                await queue.put(chunk(p * body.n + delta.index, delta.text, logprobs, None))
            for i, c in enumerate(run.job.completions):
                await queue.put(chunk(p * body.n + i, "", None, c.finish_reason))
        except Exception as e:  # after the answer has started: the error goes in the stream
            error = engine_error(e)
            await queue.put(sse(openai_error(error.status, error.type, error.message)[1]))
        finally:
            run.job.stop()
            await queue.put(None)

    tasks = [asyncio.create_task(follow(p, run)) for p, run in enumerate(runs)]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is None:
                left -= 1
            else:
                yield item
        if body.stream_options and body.stream_options.include_usage:
            done = [run.job.completions for run in runs]
            yield sse({**head, "object": "text_completion", "choices": [], "usage": usage(runs, done).model_dump()})
    finally:
        for task in tasks:
            task.cancel()
        for run in runs:
            run.job.stop()
    yield sse("[DONE]")


@router.get("/models", response_model=ModelCards, summary="List the models (OpenAI-compatible)")
async def list_models(models: ModelsDep) -> ModelCards:
    return ModelCards(data=[card(ck) for ck in models.models.values()])


@router.get("/models/{model}", response_model=ModelCard, summary="Describe one model (OpenAI-compatible)",
            responses={404: ERRORS[404]})
async def get_model(model: str, models: ModelsDep) -> ModelCard:
    return card(models.get(model))


def card(ck: Checkpoint) -> ModelCard:
    return ModelCard(id=ck.name, created=created(ck), owned_by=OWNER)


def created(ck: Checkpoint) -> int:
    """When the checkpoint was trained (its metadata), else when its file was written; Unix seconds."""
    stamp = ck.training.get("created_at")
    try:
        if stamp:
            return int(datetime.fromisoformat(stamp).timestamp())
        return int(ck.path.stat().st_mtime) if ck.path is not None else 0
    except (ValueError, OSError, TypeError):
        return 0

