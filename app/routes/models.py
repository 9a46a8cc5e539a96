"""GET /models and GET /models/{name}: what is loaded, as `lyrics models --json` describes it."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import ModelsDep
from app.schemas import ErrorBody, ModelInfo, ModelList
from model_store.registry import describe

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelList, summary="List the loaded models")
async def list_models(models: ModelsDep) -> dict:
    return {"default": models.default, "models": [describe(ck, models.default) for ck in models.models.values()]}


@router.get("/models/{name}", response_model=ModelInfo, summary="Describe one model",
            responses={404: {"model": ErrorBody, "description": "no model of that name is loaded"}})
async def get_model(name: str, models: ModelsDep) -> dict:
    return describe(models.get(name), models.default)
