"""Optional API keys: LYRICS_API_KEYS unset serves everyone; set, every endpoint but the probes and docs needs a key."""

from __future__ import annotations

import logging

import pytest

from app.security import matches, parse_keys
from app.settings import Settings
from tests.app.api_helpers import assert_error

pytestmark = pytest.mark.anyio

KEY, OTHER = "k-3f9a1c7e0b", "k-second-0042"


@pytest.fixture
def keyed(model_dir):
    return Settings(model_dir=model_dir, device="cpu", default_model="gru", api_keys=f" {KEY}, {OTHER} ,")


async def test_without_keys_everything_is_open(client):
    assert (await client.get("/models")).status_code == 200


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {OTHER}"},
                                     {"X-API-Key": KEY}])
async def test_a_configured_key_is_accepted_as_bearer_or_x_api_key(make_client, keyed, headers):
    async with make_client(keyed) as (_, client):
        assert (await client.get("/models", headers=headers)).status_code == 200
        r = await client.post("/generate", json={"prefix": "分开", "max_chars": 3}, headers=headers)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                                     {"X-API-Key": KEY[:-1]}, {"Authorization": "Bearer "}])
async def test_a_missing_or_wrong_key_gets_401_in_the_error_shape(make_client, keyed, headers):
    async with make_client(keyed) as (_, client):
        for method, path in (("GET", "/models"), ("GET", "/models/gru"), ("POST", "/generate"),
                             ("POST", "/perplexity"), ("GET", "/metrics"), ("GET", "/no-such-path")):
            r = await client.request(method, path, json={"prefix": "分开"}, headers=headers)
            error = assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
            assert KEY not in r.text and OTHER not in r.text and KEY[:-1] not in error["message"]


async def test_probes_and_docs_stay_public(make_client, keyed):
    async with make_client(keyed) as (_, client):
        for path in ("/healthz", "/readyz", "/docs", "/openapi.json", "/docs-static/swagger-ui-bundle.js"):
            assert (await client.get(path)).status_code == 200, path


async def test_an_oversized_body_without_a_key_is_refused_before_it_is_read(make_client, keyed):
    async with make_client(keyed) as (_, client):
        r = await client.post("/generate", content=b"x" * (keyed.max_body_bytes + 1))
        assert_error(r, 401)


async def test_openapi_declares_the_schemes_only_when_keys_are_set(make_client, keyed, client):
    assert "securitySchemes" not in (await client.get("/openapi.json")).json().get("components", {})
    async with make_client(keyed) as (_, keyed_client):
        schema = (await keyed_client.get("/openapi.json")).json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert schema["security"] == [{"bearer": []}, {"apiKey": []}]
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    assert "security" not in schema["paths"]["/generate"]["post"]  # the global requirement applies


async def test_keys_never_reach_the_logs(make_client, keyed, caplog):
    caplog.set_level(logging.DEBUG)
    async with make_client(keyed) as (_, client):
        await client.get("/models", headers={"Authorization": f"Bearer {KEY}"})
        await client.post("/generate", json={"prefix": "分开", "max_chars": 2}, headers={"X-API-Key": OTHER})
        await client.get("/models", headers={"Authorization": "Bearer not-a-key-77"})
        await client.post("/generate", json={"prefix": "分开", "model": "nope"}, headers={"X-API-Key": KEY})
    assert "/models" in caplog.text  # the access log did run
    for secret in (KEY, OTHER, "not-a-key-77"):
        assert secret not in caplog.text
    assert KEY not in repr(keyed) and KEY not in str(keyed.model_dump())


def test_matching_checks_every_key_and_parses_the_setting():
    keys = parse_keys("a, b,,c ")
    assert keys == ["a", "b", "c"]
    assert matches("c", keys) and matches("a", keys)
    assert not matches(None, keys) and not matches("", keys) and not matches("ab", keys) and not matches("a", [])
