"""POST /admin/reload: rescan LYRICS_MODEL_DIR without a restart. Mounted only when LYRICS_ADMIN_TOKEN is set.

The new set of models replaces the old one in one assignment: a request that already looked
up its model keeps that Checkpoint to the end, and the engine retires the scheduler of every
model that left the set once its requests are done.
"""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request

from app.deps import EngineDep, MetricsDep, SettingsDep
from app.errors import ApiError
from app.security import matches, presented_key
from app.served import ReloadError, rescan

# An operator's endpoint, guarded by its own token: left out of the public OpenAPI schema.
router = APIRouter(tags=["admin"], include_in_schema=False)


@router.post("/admin/reload", summary="Reload the model directory")
async def reload(request: Request, engine: EngineDep, settings: SettingsDep, metrics: MetricsDep) -> dict:
    token = presented_key(dict(request.scope["headers"]), api_key_header=False)
    expected = settings.admin_token.get_secret_value() if settings.admin_token is not None else ""
    if not expected or not matches(token, [expected]):
        raise ApiError(401, "unauthorized", "a valid admin token is required: send 'Authorization: Bearer TOKEN'",
                       headers={"WWW-Authenticate": "Bearer"})
    async with request.app.state.reload_lock:  # one reload at a time
        current = request.app.state.models
        try:
            served, report = await anyio.to_thread.run_sync(rescan, settings, current)
        except ReloadError as e:
            raise ApiError(409, "conflict", str(e)) from e
        request.app.state.models = served
    kept = {id(ck.model) for ck in served.models.values()}
    for ck in current.models.values():
        if id(ck.model) not in kept:
            engine.retire(ck.model)
    metrics.models_loaded.set(len(served.models))
    return report
