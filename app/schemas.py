"""Request and response bodies, with the ranges, defaults and examples the OpenAPI page shows.

Fixed ranges live here; the limits an operator can change (LYRICS_MAX_*) are checked by
`limit_errors` after parsing, with the same 422 shape.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_serializer
from pydantic_core import PydanticCustomError

from app.settings import Settings
from model_store.sampling import LYRIC_DEFAULTS, SamplingParams, decoding

Unknown = Literal["error", "skip"]
UNKNOWN_HELP = ("characters outside the model's vocabulary: 'error' answers 422 naming them; 'skip' drops them "
                "and reports them in unknown_characters")
MAX_SEED = 2**53 - 1  # exact in every JSON client
MAX_LOGPROBS = 20  # alternatives per character
EMPTY_PREFIX = "a prefix needs at least one character: the model continues text, it cannot start from nothing"


class StrictBody(BaseModel):
    """Unknown fields, NaN and infinity are errors, not silently accepted."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ContinueFields(StrictBody):
    """The fields of a continuation that /generate and /compare share, and their limit checks."""

    prefix: str = Field(max_length=1_000_000, examples=["分开"], description=(
        "text to continue: at least one character (the model needs a character to start from; on /generate "
        "none is needed with `state`), at most "
        "LYRICS_MAX_PREFIX_CHARS. For models trained with newlines='space', newlines become spaces."))
    max_chars: int = Field(50, ge=0, le=1_000_000, description=(
        "characters to generate at most, up to LYRICS_MAX_NEW_CHARS (omitted: 50, or that limit if lower)"))
    temperature: float | None = Field(None, ge=0.0, le=100.0, examples=[0.8], description=(
        f"omitted: {LYRIC_DEFAULTS['temperature']}, sampled with the lyric defaults below. 0: greedy (always the "
        "likeliest character, as the tutorial's predict; the same prefix always gives the same text, and the "
        "fields below default to off); higher: more random"))
    top_k: int = Field(0, ge=0, le=1_000_000, description="sample among the k likeliest characters (0: no limit)")
    top_p: float | None = Field(None, gt=0.0, le=1.0, examples=[0.95], description=(
        "nucleus sampling: the smallest set of characters whose probability reaches top_p (1: no limit). "
        f"Omitted: {LYRIC_DEFAULTS['top_p']} when sampled, 1 when greedy"))
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0, description="> 1 makes characters already in the "
                                                                          "text less likely (1: off)")
    no_repeat_ngram: int | None = Field(None, ge=0, le=1000, examples=[4], description=(
        "n >= 2: never generate an n-character sequence that is already in the prefix or the generated text "
        "(so a line cannot loop); 0: off. A structure constraint that allows only such characters wins. "
        f"Omitted: {LYRIC_DEFAULTS['no_repeat_ngram']} when sampled, 0 when greedy"))
    no_blank_runs: bool | None = Field(None, description=(
        "never generate a blank (space, line break) right after a blank: no empty lines, no runs of spaces. "
        "Omitted: true when sampled, false when greedy"))
    max_char_run: int | None = Field(None, ge=0, le=1000, examples=[2], description=(
        "k >= 1: never generate one character more than k times in a row, counting the prefix's end "
        f"(no 啦啦啦 with 2); 0: off. Omitted: {LYRIC_DEFAULTS['max_char_run']} when sampled, 0 when greedy"))
    min_line_chars: int | None = Field(None, ge=0, le=1000, examples=[6], description=(
        "k >= 1: never end a line (a line break) before it has k characters, the prefix's last line counted; "
        "0: off. A structure constraint that asks for a shorter line wins. "
        f"Omitted: {LYRIC_DEFAULTS['min_line_chars']} when sampled, 0 when greedy"))
    best_of: int | None = Field(None, ge=1, le=64, examples=[8], description=(
        "candidates sampled side by side for each continuation; every best_of_chars characters the one the model "
        "finds likeliest is kept and the others continue from it (each continuation costs best_of rows of the "
        f"batch; at most LYRICS_MAX_BEST_OF). Omitted: {LYRIC_DEFAULTS['best_of']} when sampled, 1 when greedy"))
    best_of_chars: int | None = Field(None, ge=1, le=1_000_000, examples=[5], description=(
        f"how often best_of compares its candidates, in characters (omitted: {LYRIC_DEFAULTS['best_of_chars']})"))
    stop: list[str] = Field([], max_length=1000, examples=[["\n"]], description=(
        "stop as soon as one of these strings is generated; it is not included in the text "
        "(at most LYRICS_MAX_STOP strings of LYRICS_MAX_STOP_CHARS characters)"))
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=(
        "seed for sampled text (temperature > 0): the same seed gives the same text (on /generate choice i "
        "uses seed + i). Omitted: a random seed, returned in the answer"))
    unknown: Unknown = Field("error", description=UNKNOWN_HELP)

    @field_validator("no_repeat_ngram")
    @classmethod
    def ngram_of_two_or_more(cls, n: int | None) -> int | None:
        if n == 1:
            raise PydanticCustomError("no_repeat_ngram", "no_repeat_ngram must be 0 (off) or at least 2: with 1 "
                                                         "no character could ever appear twice")
        return n

    @field_validator("stop")
    @classmethod
    def stop_strings_bounded(cls, stop: list[str]) -> list[str]:
        if any(len(s) > 10_000 for s in stop):
            raise PydanticCustomError("stop_too_long", "stop strings must be at most 10000 characters")
        return stop

    def limit_errors(self, settings: Settings) -> list[dict]:
        """Problems with the operator's limits. An omitted max_chars is lowered to the limit, not an error."""
        if "max_chars" not in self.model_fields_set:
            self.max_chars = min(self.max_chars, settings.max_new_chars)
        checks = [
            ("prefix", len(self.prefix) <= settings.max_prefix_chars,
             f"the prefix has {len(self.prefix)} characters; the limit is {settings.max_prefix_chars}"),
            ("max_chars", self.max_chars <= settings.max_new_chars,
             f"must be at most {settings.max_new_chars}"),
            ("stop", len(self.stop) <= settings.max_stop, f"at most {settings.max_stop} stop strings"),
            ("best_of", (self.best_of or 1) <= settings.max_best_of, f"must be at most {settings.max_best_of}"),
            ("stop", all(len(s) <= settings.max_stop_chars for s in self.stop),
             f"each stop string must be at most {settings.max_stop_chars} characters"),
        ]
        errors = [{"loc": ["body", field], "msg": msg, "type": "limit_exceeded"} for field, ok, msg in checks if not ok]
        if not self.prefix and not self.continues_a_text():
            errors.insert(0, {"loc": ["body", "prefix"], "msg": EMPTY_PREFIX, "type": "empty_prefix"})
        return errors

    def continues_a_text(self) -> bool:
        """Whether the model has already read text (a state handle), so that an empty prefix will do."""
        return False

    def sampling(self) -> SamplingParams:
        """How the characters are chosen: the fields given, the lyric defaults for the others."""
        return decoding(self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.no_repeat_ngram,
                        self.no_blank_runs, self.best_of, self.best_of_chars, self.max_char_run,
                        self.min_line_chars)


LineLengths = StrictInt | Annotated[str, Field(max_length=10_000)] | Annotated[list[StrictInt], Field(max_length=1000)]


class Constraints(StrictBody):
    """Structure of the generated text, enforced at every step by masking the vocabulary (see README)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"lines": 4, "line_lengths": "7-7-7-7", "rhyme": True},
        {"lines": 3, "line_lengths": [5, 7, 5], "banned": "的", "required": "风", "rhyme": "ang"},
    ]})

    lines: int | None = Field(None, ge=1, le=1000, examples=[4], description=(
        "the generated text is exactly this many lines, each ending with a line break (a space for models "
        "trained with newlines='space'); generation ends after the last. Lines count from the end of the prefix"))
    line_lengths: LineLengths | None = Field(None, examples=["7-7-7-7", 5, [5, 7, 5]], description=(
        "characters per line: one number for every line, a pattern such as '7-7-7-7' or a list; a pattern "
        "shorter than `lines` repeats. The line break is held back until a line has its length, then forced"))
    banned: str = Field("", max_length=10_000, examples=["的了"], description="characters never generated")
    required: str = Field("", max_length=1000, examples=["风"], description=(
        "characters that must appear: once the free positions left are as few as the required characters still "
        "missing, those positions may only take them (so they come near the end); `constraints_met` says if "
        "they all appeared"))
    rhyme: StrictBool | Annotated[str, Field(max_length=20)] | None = Field(None, examples=[True, "ang"], description=(
        "with line_lengths: every line ends with a character of the same final (韵母, pypinyin, no tone, "
        "compared exactly). true: the first line's ending sets it; a final such as 'ang' names it"))


class GenerateRequest(ContinueFields):
    """Continue a prefix, character by character."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prefix": "分开"},
        {"prefix": "分开", "max_chars": 80, "temperature": 0.8, "top_k": 20, "seed": 7, "n": 2},
        {"prefix": "分开", "max_chars": 100, "temperature": 0.7, "stop": ["\n"], "stream": True},
        {"prefix": "分开的爱\n", "return_state": True},
        {"prefix": "\n", "state": "ls1.<the 'state' of an earlier answer>.<signature>"},
        {"prefix": "分开\n", "temperature": 0.8, "seed": 7,
         "constraints": {"lines": 4, "line_lengths": "7-7-7-7", "rhyme": True}},
    ]})

    model: str | None = Field(None, max_length=200, examples=["gru"], description=(
        "a name from GET /models; default: the service's default model, or with `state` the handle's model"))
    n: int = Field(1, ge=1, le=1000, description="number of continuations (up to LYRICS_MAX_N)")
    stream: bool = Field(False, description="answer with server-sent events as the text is generated")
    return_state: bool = Field(False, description=(
        "also answer `state` (and each choice's): an opaque, signed handle on the model's state after the whole "
        "text (a stop string that ended it included), valid for LYRICS_STATE_TTL_S seconds"))
    state: str | None = Field(None, max_length=1_000_000, examples=["ls1.<body>.<signature>"], description=(
        "continue from a handle returned in `state`: the model reads `prefix` (it may be empty) after the text "
        "the handle ends, exactly as if the whole text had been sent again. Altered, expired or another "
        "model's handles get 422"))
    constraints: Constraints | None = Field(None, description=(
        "structure of the generated text: lines, characters per line, banned and required characters, rhyme; "
        "the answer says which were met (`constraints_met`)"))
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, examples=[3], description=(
        "also answer each generated character's log-probability and the `logprobs` likeliest characters at its "
        "place (0: the character's alone), in each choice's `logprobs` and in each streamed chunk. They are the "
        "model's own probabilities, before temperature, filters and constraints: the numbers /perplexity gives "
        "the same text (a mixture model's are those of its recurrent model, which writes; its /perplexity adds "
        "the cache)"))

    def continues_a_text(self) -> bool:
        return self.state is not None

    def limit_errors(self, settings: Settings) -> list[dict]:
        errors = super().limit_errors(settings)
        if self.n > settings.max_n:
            errors.append({"loc": ["body", "n"], "msg": f"must be at most {settings.max_n}", "type": "limit_exceeded"})
        return errors


class WhenAsked(BaseModel):
    """`state` and `constraints_met` appear only in answers to requests that asked for them."""

    @model_serializer(mode="wrap")
    def omit_unasked(self, handler):
        data = handler(self)
        for name in ("state", "constraints_met", "logprobs"):
            if data.get(name) is None:
                data.pop(name, None)
        return data


class Alternative(BaseModel):
    char: str
    logprob: float = Field(description="ln p(char | the text before it)")


class CharLogprob(Alternative):
    """A generated character, its log-probability and the likeliest characters at its place."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"char": "的", "logprob": -1.02, "top": [{"char": "的", "logprob": -1.02}, {"char": "我", "logprob": -2.3}]}]})

    top: list[Alternative] = Field(description="the `logprobs` likeliest characters, likeliest first")


class Choice(WhenAsked):
    index: int
    text: str = Field(description="prefix + generated")
    generated: str = Field(description="the new characters only")
    finish_reason: Literal["length", "stop"] = Field(description="'length': max_chars reached; 'stop': a stop "
                                                                 "string was generated")
    seed: int | None = Field(description="the seed that reproduces this choice (null for greedy)")
    state: str | None = Field(None, description="with return_state: the handle to continue this choice from")
    constraints_met: dict[str, bool] | None = Field(None, examples=[{"lines": True, "rhyme": True}], description=(
        "with constraints: whether this choice's generated text meets each one given (read from the text)"))
    logprobs: list[CharLogprob] | None = Field(None, description="with logprobs: one entry per generated character")


class GenerateUsage(BaseModel):
    prompt_chars: int
    generated_chars: int = Field(description="over all choices")


class GenerateResponse(WhenAsked):
    """Choice 0's text, generated, finish_reason, seed, state and constraints_met are repeated at the top level."""

    model: str
    prefix: str = Field(description="the prefix as the model read it (newlines or unknown characters handled)")
    text: str
    generated: str
    finish_reason: Literal["length", "stop"]
    seed: int | None
    choices: list[Choice]
    usage: GenerateUsage
    unknown_skipped: int = Field(0, description="characters dropped from the prefix (unknown='skip')")
    unknown_characters: list[str] = Field([], description="the distinct characters dropped")
    state: str | None = Field(None, description="choice 0's state handle (with return_state)")
    constraints_met: dict[str, bool] | None = Field(None, description="choice 0's constraints_met (with constraints)")


class StreamChunk(BaseModel):
    """One server-sent event per generated chunk."""

    index: int = Field(description="the choice this text belongs to")
    text: str
    logprobs: list[CharLogprob] | None = Field(None, description="with logprobs: one entry per character of text")


class PerplexityRequest(StrictBody):
    """Score how well a model predicts a text (or several)."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"text": "分开的爱 我不要"},
        {"text": ["分开的爱", "我不要 再想你"], "model": "gru", "unknown": "skip"},
        {"text": "分开的爱 我不要", "per_char": True, "top_spans": 2, "span_chars": 2},
    ]})

    text: str | list[str] = Field(description=(
        "a text, or a list of texts (at most LYRICS_MAX_TEXTS), each of at least two characters and at most "
        "LYRICS_MAX_TEXT_CHARS: the first character is only read, every later one is predicted"))
    model: str | None = Field(None, max_length=200, description="a name from GET /models; default: the default model")
    unknown: Unknown = Field("error", description=UNKNOWN_HELP)
    per_char: bool = Field(False, description=(
        "also answer every character's nll (`per_char`) and the most surprising spans (`surprising_spans`); "
        "the texts together may then have at most LYRICS_MAX_PER_CHAR_CHARS characters"))
    top_spans: int = Field(3, ge=0, le=100, description="with per_char: how many surprising spans per text")
    span_chars: int = Field(3, ge=1, le=100, description="with per_char: characters per span (a shorter text: "
                                                         "the whole text)")

    @property
    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else self.text

    def limit_errors(self, settings: Settings) -> list[dict]:
        errors: list[dict] = []
        if isinstance(self.text, list) and not self.text:
            errors.append({"loc": ["body", "text"], "msg": "the list of texts is empty", "type": "too_short"})
        if len(self.texts) > settings.max_texts:
            errors.append({"loc": ["body", "text"], "msg": f"at most {settings.max_texts} texts per request",
                           "type": "limit_exceeded"})
        for i, t in enumerate(self.texts[: settings.max_texts]):
            loc = ["body", "text"] + ([i] if isinstance(self.text, list) else [])
            if len(t) > settings.max_text_chars:
                errors.append({"loc": loc, "msg": f"the text has {len(t)} characters; the limit is "
                                                  f"{settings.max_text_chars}", "type": "limit_exceeded"})
        if self.per_char and (total := sum(map(len, self.texts))) > settings.max_per_char_chars:
            errors.append({"loc": ["body", "text"], "type": "limit_exceeded",
                           "msg": f"with per_char the texts may have {settings.max_per_char_chars} characters in all "
                                  f"(LYRICS_MAX_PER_CHAR_CHARS); these have {total}"})
        return errors


class Score(BaseModel):
    perplexity: float | None = Field(description="exp(cross_entropy); null if it overflows")
    cross_entropy: float = Field(description="mean nats per scored character")
    bits_per_char: float
    chars_scored: int = Field(description="every character but the first")
    unknown_skipped: int = Field(0, description="characters dropped (unknown='skip')")
    unknown_characters: list[str] = Field([], description="the distinct characters dropped")


class CharSurprisal(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"char": "开", "nll": 2.31, "nll_bits": 3.33},
                                                              {"char": "分", "nll": None, "nll_bits": None}]})

    char: str
    nll: float | None = Field(description="nats: -ln p(char | every character before it); null where nothing "
                                          "was predicted: the first character and characters dropped as unknown")
    nll_bits: float | None = Field(description="nll / ln 2")


class SurprisingSpan(BaseModel):
    """span_chars consecutive characters, ranked by the total nll of their scored characters."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"start": 4, "end": 6, "text": "我不", "nats": 9.2, "bits": 13.27, "mean_nats": 4.6, "mean_bits": 6.64,
         "chars_scored": 2}]})

    start: int = Field(description="offset of the first character in per_char (the text as the model read it)")
    end: int = Field(description="offset just past the last character")
    text: str
    nats: float = Field(description="total nll of the span's scored characters")
    bits: float
    mean_nats: float = Field(description="nats / chars_scored")
    mean_bits: float
    chars_scored: int


class Surprisal(BaseModel):
    per_char: list[CharSurprisal] | None = Field(None, description=(
        "with per_char: every character of the text, as the model read it (newlines handled), in order; the mean "
        "of the non-null nll is cross_entropy"))
    surprising_spans: list[SurprisingSpan] | None = Field(None, description=(
        "with per_char: the top_spans spans of span_chars characters with the highest total nll, most surprising "
        "first, no two overlapping"))


class TextScore(Score, Surprisal):
    index: int


class PerplexityResponse(Score, Surprisal):
    """The top-level numbers are over all texts together (for one text: that text's). With per_char,
    `per_char` and `surprising_spans` are in each entry of `results`, and at the top level too when
    `text` is one string."""

    model: str
    unknown: Unknown
    results: list[TextScore]


class CompareRequest(ContinueFields):
    """Run one prefix, with the same settings and seed, through several models."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"prefix": "分开"},
        {"prefix": "分开", "models": ["rnn", "gru", "lstm"], "max_chars": 40, "temperature": 0.8, "seed": 7,
         "text": "分开的爱 我不要"},
    ]})

    models: list[str] | None = Field(None, min_length=1, max_length=64, examples=[["rnn", "gru", "lstm"]],
                                     description="names from GET /models, each once; default: every loaded model")
    text: str | None = Field(None, max_length=1_000_000, examples=["分开的爱 我不要"], description=(
        "a text every model scores (perplexity side by side), at least two characters and at most "
        "LYRICS_MAX_TEXT_CHARS; omitted: nothing is scored (a model's perplexity on its own output says more "
        "about the sampling settings than about the model)"))

    def limit_errors(self, settings: Settings) -> list[dict]:
        errors = super().limit_errors(settings)
        if self.text is not None and len(self.text) > settings.max_text_chars:
            errors.append({"loc": ["body", "text"], "type": "limit_exceeded",
                           "msg": f"the text has {len(self.text)} characters; the limit is {settings.max_text_chars}"})
        if self.models and len(set(self.models)) < len(self.models):
            errors.append({"loc": ["body", "models"], "type": "duplicate_model",
                           "msg": "each model may be named once"})
        return errors


class ModelSummary(BaseModel):
    """A model's name, cell and sizes, from its checkpoint."""

    name: str
    cell: str
    hidden_size: int
    num_layers: int
    embed_size: int
    vocab_size: int
    parameters: int
    newlines: str = Field(description="'keep': the model writes line breaks; 'space': newlines become spaces")


class Provenance(ModelSummary):
    """How a model was made, from its checkpoint (null where the checkpoint does not say)."""

    epochs: int | None = Field(description="epochs trained")
    best_epoch: int | None = Field(description="the epoch kept (lowest validation perplexity)")
    train_perplexity: float | None
    val_perplexity: float | None
    command: str | None = Field(description="the training command line")
    corpus_sha256: str | None = Field(description="SHA-256 of the training corpus file")
    corpus_chars: int | None
    created_at: str | None


class CompareResult(BaseModel):
    model: str
    prefix: str = Field(description="the prefix as this model read it (newlines or unknown characters handled)")
    text: str = Field(description="prefix + generated")
    generated: str
    finish_reason: Literal["length", "stop"]
    latency_ms: float = Field(description="this model's generation, from submission to its last character "
                                          "(time waiting for a place in its batch included)")
    score: Score | None = Field(description="the request's `text` scored by this model; null without `text`")
    score_ms: float | None = Field(description="time to score `text`; null without it")
    unknown_skipped: int = Field(0, description="characters dropped from the prefix for this model "
                                                "(unknown='skip')")
    unknown_characters: list[str] = Field([], description="the distinct characters dropped from the prefix")
    provenance: Provenance


class CompareResponse(BaseModel):
    """One result per model, in the order of `models` (default: the order of GET /models)."""

    prefix: str
    seed: int | None = Field(description="the seed every model sampled with (null for greedy)")
    text: str | None = Field(description="the text scored by every model (null: none was sent)")
    results: list[CompareResult]


class ModelInfo(ModelSummary):
    model_config = ConfigDict(extra="allow")

    default: bool
    impl: str = Field(description="'scratch' (per-step equations) or 'fused' (torch.nn RNN/GRU/LSTM)")
    packed: bool = Field(False, description="the weights are also kept in oneDNN's layout (a CPU model as the "
                                            "service loads it): generation and scoring then run the scratch "
                                            "equations on them, whatever impl says")
    device: str
    dtype: str
    train_perplexity: float | None
    val_perplexity: float | None
    training: dict[str, Any] = Field(description="the training summary stored in the checkpoint")
    mixture: dict[str, Any] | None = Field(
        default=None, description="for a mixture model: its components (recurrent model, Kneser-Ney n-gram order, "
                                  "cache order and window) and its per-bucket weights; null for a plain model")


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    default: str
    models: list[str]
    device: str


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    loc: list[str | int] = Field(description="where: ['body', field, index...]")
    msg: str
    type: str


class ErrorInfo(BaseModel):
    type: str = Field(examples=["validation_error"], description="stable machine-readable kind")
    message: str = Field(description="what went wrong and what to change")
    details: list[ErrorDetail] | None = Field(None, description="one entry per invalid field")


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer."""

    error: ErrorInfo


# Answers every JSON-body operation can give before its fields are read (documented on each such route).
BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the body could not be parsed (not UTF-8 JSON) or a bad Content-Length"},
    413: {"model": ErrorBody, "description": "the body is larger than LYRICS_MAX_BODY_BYTES"},
    415: {"model": ErrorBody, "description": "the body is not sent as application/json"},
}
