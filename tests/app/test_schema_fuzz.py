"""Schemathesis against the service's own OpenAPI document, in process (ASGI), on the tiny
test models: every operation in the document, valid and invalid requests, a fixed example
budget and derandomized generation so CI is repeatable. Checks: no 5xx, and the status code,
content type, headers and body of every answer are the documented ones.

schemathesis' own pytest integration (`from_fixture`) does not run under pytest 9 (it sets
the private `Function._nodeid`), so the operations are parametrized here and each one's
Hypothesis strategy is driven by `@given`. Valid requests made from the schema alone almost
never name a loaded model or a prefix the models know (so they would only ever see 404 and
422); half of them are therefore steered onto the test models and their vocabulary, so that
the 200 answers (JSON and event streams) are checked too."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.main import create_app
from app.settings import Settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
MODELS = ["gru", "rnn"]


def fuzz_settings(**values) -> Settings:
    # Small generation limits keep every fuzzed /generate short; larger values get the documented 422.
    return Settings(device="cpu", max_new_chars=40, max_n=3, max_texts=4, max_text_chars=2000, request_timeout_s=20,
                    api_keys="", admin_token=None, **values)


# The document does not depend on the models (no lifespan runs here), so it can be read at collection time.
SCHEMA = schemathesis.openapi.from_dict(create_app(fuzz_settings()).openapi())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
# Invalid requests need something to make invalid: a body (the only parameter, a model name, takes any string).
CASES = [pytest.param(op, mode, id=f"{op.method.upper()} {op.path} {mode.value}") for op in OPERATIONS
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode is GenerationMode.POSITIVE or op.body]


@st.composite
def steered(draw, case, chars: list[str]):
    """Half of the valid cases: a loaded model and text from its vocabulary, the other fields as generated."""
    if not draw(st.booleans()):
        return case
    model = draw(st.sampled_from(MODELS))
    known_text = st.text(st.sampled_from(chars), min_size=1, max_size=30)
    if case.path == "/models/{name}":
        case.path_parameters = {"name": model}
    elif isinstance(case.body, dict) and case.path == "/generate":
        case.body = {**case.body, "model": model, "prefix": draw(known_text),
                     "max_chars": min(case.body.get("max_chars", 20), 40), "n": min(case.body.get("n", 1), 3),
                     "stop": case.body.get("stop", [])[:3], "unknown": "error"}
    elif isinstance(case.body, dict) and case.path == "/perplexity":
        texts = draw(st.lists(known_text.filter(lambda t: len(t) > 1), min_size=1, max_size=3))
        case.body = {**case.body, "model": model, "text": texts if draw(st.booleans()) else texts[0]}
    elif isinstance(case.body, dict) and case.path == "/compare":
        text = draw(st.none() | known_text.filter(lambda t: len(t) > 1))
        body = {k: v for k, v in case.body.items() if k != "text"}
        case.body = {**body, "models": draw(st.none() | st.sampled_from([[model], MODELS])),
                     "prefix": draw(known_text), "max_chars": min(case.body.get("max_chars", 20), 40),
                     "stop": case.body.get("stop", [])[:3], "unknown": "error",
                     **({"text": text} if text is not None else {})}
    return case


@pytest.fixture(scope="module")
def fuzz_app(model_dir):
    app = create_app(fuzz_settings(model_dir=model_dir, default_model="gru"))
    yield app
    asgi.shutdown_lifespans()  # the ASGI transport started the lifespan on the first request


@pytest.mark.parametrize(("operation", "mode"), CASES)
def test_every_operation_keeps_its_documented_contract(fuzz_app, checkpoints, operation, mode):
    cases = operation.as_strategy(generation_mode=mode)
    if mode is GenerationMode.POSITIVE:
        chars = sorted(set.intersection(*(set(checkpoints[m].vocab.idx_to_char) for m in MODELS)))
        cases = cases.flatmap(lambda case: steered(case, chars))

    @given(case=cases)
    @settings(max_examples=25, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        case.call_and_validate(app=fuzz_app, checks=CHECKS)

    fuzz()
