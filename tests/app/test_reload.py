"""POST /admin/reload: exists only with LYRICS_ADMIN_TOKEN, rescans the model directory, swaps the set atomically."""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from app.engine import Engine
from app.settings import Settings
from model_store.checkpoint import load_checkpoint
from model_store.generate import Request
from tests.app.api_helpers import assert_error

pytestmark = pytest.mark.anyio

TOKEN = "admin-7c1d2e9f"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def served_dir(model_dir, tmp_path):
    """A directory of its own holding copies of gru and rnn, for the test to change."""
    for name in ("gru", "rnn"):
        shutil.copy2(model_dir / f"{name}.safetensors", tmp_path / f"{name}.safetensors")
    return tmp_path


@pytest.fixture
def admin_settings(served_dir):
    return Settings(model_dir=served_dir, device="cpu", default_model="gru", admin_token=TOKEN)


async def test_the_endpoint_is_absent_without_the_setting(client):
    assert_error(await client.post("/admin/reload", headers=ADMIN), 404)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": TOKEN},
                                     {"Authorization": TOKEN}])
async def test_a_missing_or_wrong_token_gets_401(make_client, admin_settings, headers):
    async with make_client(admin_settings) as (_, client):
        r = await client.post("/admin/reload", headers=headers)
        error = assert_error(r, 401, "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer" and TOKEN not in error["message"]


async def test_a_new_checkpoint_is_loaded_listed_and_generates(make_client, admin_settings, served_dir, model_dir):
    async with make_client(admin_settings) as (_, client):
        shutil.copy(model_dir / "gru.safetensors", served_dir / "fresh.safetensors")
        r = await client.post("/admin/reload", headers=ADMIN)
        assert r.status_code == 200, r.text
        assert r.json() == {"loaded": ["fresh"], "unchanged": ["gru", "rnn"], "removed": [], "skipped": {},
                            "default": "gru"}
        assert [m["name"] for m in (await client.get("/models")).json()["models"]] == ["fresh", "gru", "rnn"]
        fresh = await client.post("/generate", json={"prefix": "分开", "max_chars": 12, "model": "fresh", "seed": 3})
        gru = await client.post("/generate", json={"prefix": "分开", "max_chars": 12, "model": "gru", "seed": 3})
        assert fresh.status_code == 200 and fresh.json()["text"] == gru.json()["text"]
        again = (await client.post("/admin/reload", headers=ADMIN)).json()
        assert again["loaded"] == [] and again["unchanged"] == ["fresh", "gru", "rnn"]


async def test_a_corrupt_file_is_skipped_and_the_others_keep_serving(make_client, admin_settings, served_dir):
    async with make_client(admin_settings) as (_, client):
        (served_dir / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
        report = (await client.post("/admin/reload", headers=ADMIN)).json()
        assert list(report["skipped"]) == ["corrupt.safetensors"] and "corrupt" in report["skipped"]["corrupt.safetensors"]
        assert report["unchanged"] == ["gru", "rnn"] and report["loaded"] == []
        r = await client.post("/generate", json={"prefix": "分开", "max_chars": 5, "model": "rnn"})
        assert r.status_code == 200
        assert_error(await client.get("/models/corrupt"), 404, "model_not_found")


async def test_changed_and_removed_files(make_client, admin_settings, served_dir, model_dir):
    async with make_client(admin_settings) as (app, client):
        old_rnn = app.state.models.models["rnn"]
        await client.post("/generate", json={"prefix": "分开", "max_chars": 3, "model": "rnn"})
        scheduler = app.state.engine.schedulers[id(old_rnn.model)]
        (served_dir / "rnn.safetensors").unlink()
        st = (served_dir / "gru.safetensors").stat()
        os.utime(served_dir / "gru.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
        report = (await client.post("/admin/reload", headers=ADMIN)).json()
        assert report["removed"] == ["rnn"] and report["unchanged"] == ["gru"]
        assert_error(await client.get("/models/rnn"), 404, "model_not_found")
        scheduler.thread.join(5)  # the removed model's scheduler is retired, not leaked
        assert not scheduler.thread.is_alive() and id(old_rnn.model) not in app.state.engine.schedulers

        shutil.copy(model_dir / "rnn.safetensors", served_dir / "gru.safetensors")  # gru's file now holds other bytes
        report = (await client.post("/admin/reload", headers=ADMIN)).json()
        assert report["loaded"] == ["gru"] and report["unchanged"] == []
        assert (await client.get("/models/gru")).json()["cell"] == "rnn"


async def test_a_broken_new_version_keeps_the_old_one_serving(make_client, admin_settings, served_dir):
    async with make_client(admin_settings) as (_, client):
        (served_dir / "rnn.safetensors").write_bytes(b"truncated")
        report = (await client.post("/admin/reload", headers=ADMIN)).json()
        assert "still serving the previously loaded version" in report["skipped"]["rnn.safetensors"]
        assert (await client.post("/generate", json={"prefix": "分开", "max_chars": 3, "model": "rnn"})).status_code == 200


async def test_a_scan_that_loads_nothing_keeps_the_old_set(make_client, admin_settings, served_dir):
    async with make_client(admin_settings) as (_, client):
        for path in served_dir.iterdir():
            path.unlink()
        error = assert_error(await client.post("/admin/reload", headers=ADMIN), 409, "conflict")
        assert "still serving gru, rnn" in error["message"]
        assert [m["name"] for m in (await client.get("/models")).json()["models"]] == ["gru", "rnn"]


async def test_requests_in_flight_finish_on_the_model_they_looked_up(make_client, admin_settings, served_dir):
    async with make_client(admin_settings) as (app, client):
        body = {"prefix": "分开", "max_chars": 1500, "model": "gru", "stop": [], "seed": 1}
        alone = (await client.post("/generate", json=body)).json()["text"]
        (served_dir / "gru.safetensors").unlink()
        running = asyncio.create_task(client.post("/generate", json=body))
        while app.state.engine.in_flight == 0:
            await asyncio.sleep(0.001)
        report = (await client.post("/admin/reload", headers=ADMIN)).json()
        assert report["removed"] == ["gru"] and report["default"] == "rnn"
        assert not running.done(), "the generation should still be running during the reload"
        r = await running
        assert r.status_code == 200 and r.json()["text"] == alone
        assert app.state.engine.in_flight == 0


async def test_the_admin_token_works_alongside_api_keys(make_client, served_dir):
    settings = Settings(model_dir=served_dir, device="cpu", admin_token=TOKEN, api_keys="user-key-1")
    async with make_client(settings) as (_, client):
        assert (await client.post("/admin/reload", headers=ADMIN)).status_code == 200
        assert_error(await client.post("/admin/reload", headers={"Authorization": "Bearer user-key-1"}), 401)
        assert_error(await client.get("/models", headers=ADMIN), 401)


async def test_a_retired_model_finishes_its_work_and_a_late_request_still_runs(model_dir):
    engine = Engine(max_batch=4, max_queue=4, timeout_s=30)
    engine.start()
    try:
        ck = load_checkpoint(model_dir / "gru.safetensors")
        running = engine.submit(ck, Request("分开", 400), stream=False)
        scheduler = engine.schedulers[id(ck.model)]
        engine.retire(ck.model)
        assert id(ck.model) not in engine.schedulers
        assert len((await running.wait())[0].generated) == 400
        scheduler.thread.join(5)
        assert not scheduler.thread.is_alive() and scheduler not in engine.draining

        late = await engine.complete(ck, Request("分开", 5))  # looked up before the swap
        assert len(late[0].generated) == 5
        assert id(ck.model) not in engine.schedulers
        for s in list(engine.draining):
            s.thread.join(5)
        assert engine.draining == []
    finally:
        engine.stop()
