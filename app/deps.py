"""Shared route dependencies as typed aliases: a route names what it needs by type.

They are `async def` on purpose: FastAPI runs a plain `def` dependency on its thread pool, and
five thread hand-offs per request cost more than the whole request's HTTP handling.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.engine import Engine
from app.errors import ApiError
from app.metrics import Metrics
from app.served import ServedModels
from app.settings import Settings
from model_store.state import StateCodec


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_models(request: Request) -> ServedModels:
    models = getattr(request.app.state, "models", None)
    if models is None:
        raise ApiError(503, "not_ready", "the models are not loaded yet", headers={"Retry-After": "1"})
    return models


async def get_state_codec(request: Request) -> StateCodec:
    return request.app.state.state_codec


async def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None or not engine.running:
        raise ApiError(503, "not_ready", "the engine is not running", headers={"Retry-After": "1"})
    return engine


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
ModelsDep = Annotated[ServedModels, Depends(get_models)]
EngineDep = Annotated[Engine, Depends(get_engine)]
StateCodecDep = Annotated[StateCodec, Depends(get_state_codec)]
