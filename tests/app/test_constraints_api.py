"""POST /generate with constraints: the structure holds, the answer reports each constraint, the service
gives what model_store gives (alone or batched with others), and impossible requests get a 422."""

from __future__ import annotations

import anyio
import pytest
from api_helpers import assert_error, stream_parts

from app.settings import Settings
from model_store.constraints import Constraints, final_of
from model_store.generate import generate
from model_store.sampling import decoding

pytestmark = pytest.mark.anyio


async def post(client, **body):
    r = await client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def lines_of(generated: str, sep: str = "\n") -> list[str]:
    assert generated.endswith(sep), repr(generated)
    return generated[:-1].split(sep)


async def test_a_quatrain_of_sevens_that_rhymes(client, checkpoints):
    constraints = {"lines": 4, "line_lengths": "7-7-7-7", "rhyme": True}
    body = await post(client, prefix="分开\n", temperature=0.8, seed=5, n=2, constraints=constraints)
    for choice in body["choices"]:
        lines = lines_of(choice["generated"])
        assert [len(line) for line in lines] == [7, 7, 7, 7]
        assert len({final_of(line[-1]) for line in lines}) == 1
        assert choice["constraints_met"] == {"lines": True, "line_lengths": True, "rhyme": True}
        assert choice["finish_reason"] == "length"
    assert body["constraints_met"] == body["choices"][0]["constraints_met"]
    ck = checkpoints["gru"]
    expected = generate(ck.model, ck.vocab, "分开\n", 32, decoding(0.8), seed=5, n=2,
                        constraints=Constraints(4, "7-7-7-7", rhyme=True))
    assert [c["generated"] for c in body["choices"]] == [c.generated for c in expected]


async def test_an_omitted_max_chars_becomes_what_the_structure_takes(client):
    body = await post(client, prefix="我", constraints={"lines": 8, "line_lengths": [5, 9]})
    assert [len(line) for line in lines_of(body["generated"])] == [5, 9] * 4
    assert len(body["generated"]) == 8 * 7 + 8 > 50  # more than the default 50


async def test_banned_and_required_characters(client):
    body = await post(client, prefix="分开", max_chars=30, constraints={"banned": "的 我\n", "required": "燕檐"})
    assert not set(body["generated"]) & set("的 我\n") and {"燕", "檐"} <= set(body["generated"])
    assert body["constraints_met"] == {"banned": True, "required": True}


async def test_a_named_final(client):
    body = await post(client, prefix="我", temperature=1.0, seed=2,
                      constraints={"lines": 3, "line_lengths": 4, "rhyme": "ai"})
    assert [final_of(line[-1]) for line in lines_of(body["generated"])] == ["ai"] * 3


async def test_models_without_line_breaks_end_lines_with_a_space(client):
    body = await post(client, prefix="分开", model="rnn", constraints={"lines": 3, "line_lengths": 3})
    assert [len(line) for line in lines_of(body["generated"], " ")] == [3, 3, 3]
    assert body["constraints_met"] == {"lines": True, "line_lengths": True}


async def test_the_final_stream_event_reports_the_constraints(client):
    r = await client.post("/generate", json={"prefix": "你", "stream": True, "constraints": {"lines": 2, "line_lengths": 3}})
    chunks, final, _ = stream_parts(r.text)
    assert chunks[0] == final["generated"] and [len(x) for x in lines_of(final["generated"])] == [3, 3]
    assert final["constraints_met"] == {"lines": True, "line_lengths": True}


async def test_constraints_apply_to_a_continuation(client):
    first = await post(client, prefix="分开\n", return_state=True, constraints={"lines": 1, "line_lengths": 5})
    then = await post(client, prefix="", state=first["state"], constraints={"lines": 2, "line_lengths": 6})
    assert [len(x) for x in lines_of(first["generated"])] == [5] and [len(x) for x in lines_of(then["generated"])] == [6, 6]


async def test_unconstrained_answers_carry_no_report(client):
    body = await post(client, prefix="分开", max_chars=5)
    assert "constraints_met" not in body and "constraints_met" not in body["choices"][0]


async def test_constrained_and_plain_requests_batched_together_each_get_what_they_get_alone(make_client, model_dir,
                                                                                           checkpoints):
    requests = [dict(prefix="分开", temperature=0.9, seed=i, max_chars=40,
                     constraints=[None, {"lines": 3, "line_lengths": "3-5"}, {"banned": "的爱"},
                                  {"lines": 2, "line_lengths": 4, "rhyme": True, "required": "燕"}][i % 4])
                for i in range(12)]
    results = {}
    # each request is best_of (8) rows: three fit in a batch, the others queue
    settings = Settings(model_dir=model_dir, device="cpu", default_model="gru", max_batch=24, max_queue=96)
    async with make_client(settings) as (_, c):
        async def run(i):
            results[i] = await post(c, **{k: v for k, v in requests[i].items() if v is not None})
        async with anyio.create_task_group() as tg:
            for i in range(len(requests)):
                tg.start_soon(run, i)
    ck = checkpoints["gru"]
    for i, request in enumerate(requests):
        spec = request["constraints"]
        [alone] = generate(ck.model, ck.vocab, "分开", 40, decoding(0.9), seed=i,
                           constraints=Constraints(**spec) if spec else None)
        assert results[i]["generated"] == alone.generated and results[i].get("constraints_met") == alone.constraints_met


@pytest.mark.parametrize("constraints,field,words", [
    ({"banned": "的", "required": "的"}, "required", "both required and banned"),
    ({"required": "☃"}, "required", "cannot write"),
    ({"lines": 2, "line_lengths": 2, "rhyme": "iu"}, "rhyme", "no character"),
    ({"rhyme": True}, "rhyme", "needs line_lengths"),
    ({"lines": 4, "line_lengths": 7}, "line_lengths", "needs 32 characters"),
    ({"line_lengths": "7-x"}, "line_lengths", "not a pattern"),
    ({"line_lengths": [3, 0]}, "line_lengths", "positive"),
    ({"lines": 2, "banned": "\n"}, "banned", "separator"),
])
async def test_impossible_or_contradictory_constraints_are_422(client, constraints, field, words):
    r = await client.post("/generate", json={"prefix": "分开", "max_chars": 20, "constraints": constraints})
    error = assert_error(r, 422, "impossible_constraints")
    assert error["details"][0]["loc"] == ["body", "constraints", field] and words in error["message"]


async def test_a_structure_beyond_the_service_limit_is_422(client):
    r = await client.post("/generate", json={"prefix": "分开", "constraints": {"lines": 300, "line_lengths": 9}})
    assert "limit is 2000" in assert_error(r, 422, "impossible_constraints")["message"]


@pytest.mark.parametrize("constraints", [{"lines": 0}, {"lines": "four"}, {"line_lengths": True},
                                         {"rhyme": 1}, {"banned": ["的"]}, {"meter": "iambic"}])
async def test_malformed_constraints_are_422(client, constraints):
    r = await client.post("/generate", json={"prefix": "分开", "constraints": constraints})
    assert assert_error(r, 422, "validation_error")["details"][0]["loc"][:2] == ["body", "constraints"]
