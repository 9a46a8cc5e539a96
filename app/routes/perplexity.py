"""POST /perplexity: how well a model predicts a text (or each of several)."""

from __future__ import annotations

import math

from fastapi import APIRouter

from app.deps import EngineDep, MetricsDep, ModelsDep, SettingsDep
from app.engine import ENGINE_ERRORS
from app.errors import engine_error, invalid
from app.inputs import drop_unknown, model_text, unknown_error
from app.schemas import BODY_ERRORS, ErrorBody, PerplexityRequest, PerplexityResponse, TextScore
from model_store.checkpoint import Checkpoint, finite_or_none
from model_store.scoring import Score, score_text
from model_store.surprisal import surprisal_json

router = APIRouter(tags=["perplexity"])

DOC = """Perplexity = exp(mean cross-entropy) of each text under the model, the state carried
through the whole text: every character after the first is predicted from all before it.
Lower is better; a model that guessed uniformly would score its vocabulary size.
`text` may be a list: each text gets its own entry in `results`, and the top-level numbers
are over all scored characters together.

**Per-character surprisal** (`"per_char": true`): `per_char` lists every character of the
text as the model read it, `{"char", "nll", "nll_bits"}`, with nll = -ln p(char | all before it)
in nats. The first character has nothing before it to be predicted from, and characters
dropped with `"unknown": "skip"` are not predicted: their nll is null. The mean of the
other nlls is `cross_entropy`. `surprising_spans` are the `top_spans` runs of `span_chars`
consecutive characters with the highest total nll (offsets into `per_char`), most surprising
first, never overlapping. Both are in each entry of `results`, and at the top level when
`text` is one string. The texts of such a request may have at most
LYRICS_MAX_PER_CHAR_CHARS characters together."""


ERRORS = {**BODY_ERRORS,
          404: {"model": ErrorBody, "description": "unknown model"},
          422: {"model": ErrorBody, "description": "invalid field, limit exceeded, short text or unknown characters"},
          503: {"model": ErrorBody, "description": "busy (retry after Retry-After seconds) or not ready"}}


@router.post("/perplexity", response_model=PerplexityResponse, summary="Score a text", description=DOC,
             responses=ERRORS)
async def perplexity(body: PerplexityRequest, models: ModelsDep, engine: EngineDep, settings: SettingsDep,
                     metrics: MetricsDep) -> PerplexityResponse:
    if errors := body.limit_errors(settings):
        raise invalid(errors)
    ck = models.get(body.model)
    texts, missing = prepare_texts(ck, body)
    try:
        scores = await engine.run(score_all, ck, texts, body.unknown, body.per_char)
    except ENGINE_ERRORS as e:
        raise engine_error(e) from e
    results = [TextScore(index=i, **score_fields(s, missing[i]),
                         **(surprisal_json(s, body.top_spans, body.span_chars) if body.per_char else {}))
               for i, s in enumerate(scores)]
    one = results[0] if isinstance(body.text, str) else None  # one text: its surprisal at the top level too
    chars = sum(s.chars_scored for s in scores)
    ce = sum(s.cross_entropy * s.chars_scored for s in scores) / chars
    metrics.scored_chars.labels(ck.name).inc(chars)
    return PerplexityResponse(model=ck.name, unknown=body.unknown, results=results,
                              perplexity=finite_or_none(math.exp(ce) if ce < 700 else math.inf), cross_entropy=ce,
                              bits_per_char=ce / math.log(2), chars_scored=chars,
                              unknown_skipped=sum(s.unknown_skipped for s in scores),
                              unknown_characters=list(dict.fromkeys(c for r in results for c in r.unknown_characters)),
                              per_char=one.per_char if one else None,
                              surprising_spans=one.surprising_spans if one else None)


def prepare_texts(ck: Checkpoint, body: PerplexityRequest) -> tuple[list[str], list[list[str]]]:
    """The texts as the model reads them, and each one's unknown characters; 422 for what cannot be scored."""
    texts, missing, errors = [], [], []
    for i, text in enumerate(body.texts):
        loc = ["body", "text"] + ([i] if isinstance(body.text, list) else [])
        text, unknown, error = scorable_text(ck, text, body.unknown, loc)
        texts.append(text)
        missing.append(unknown)
        if error:
            errors.append(error)
    if errors:
        raise invalid(errors)
    return texts, missing


def scorable_text(ck: Checkpoint, text: str, unknown: str, loc: list) -> tuple[str, list[str], dict | None]:
    """The text as the model reads it, its unknown characters, and the field error if it cannot be scored."""
    text = model_text(ck, text)
    missing = ck.vocab.unknown(text)
    if missing and unknown == "error":
        return text, missing, unknown_error(ck, missing, loc)
    if len(drop_unknown(ck, text)[0]) < 2:
        what = "after dropping unknown characters, " if missing else ""
        return text, missing, {"loc": loc, "type": "too_short",
                               "msg": f"{what}the text has fewer than two characters: nothing to predict"}
    return text, missing, None


def score_fields(s: Score, missing: list[str]) -> dict:
    """The fields of a `schemas.Score` from model_store's score of a text with these unknown characters."""
    return {"perplexity": finite_or_none(s.perplexity), "cross_entropy": s.cross_entropy,
            "bits_per_char": s.bits_per_char, "chars_scored": s.chars_scored, "unknown_skipped": s.unknown_skipped,
            "unknown_characters": missing if s.unknown_skipped else []}


def score_all(ck: Checkpoint, texts: list[str], unknown: str, per_char: bool = False):
    return [score_text(ck.model, ck.vocab, t, unknown=unknown, per_char=per_char) for t in texts]
