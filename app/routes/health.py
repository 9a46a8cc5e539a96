"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.deps import MetricsDep, get_engine, get_models
from app.errors import ApiError
from app.schemas import ErrorBody, Health, Ready

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", response_model=Ready, summary="Models are loaded and the engine is running",
            responses={503: {"model": ErrorBody, "description": "not ready yet (or shutting down)"}})
async def readyz(request: Request) -> dict:
    models = await get_models(request)
    if (await get_engine(request)).closing:
        raise ApiError(503, "not_ready", "shutting down: finishing the requests in flight")
    return {"status": "ready", "default": models.default, "models": list(models.models), "device": models.device}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}}})
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=metrics.content_type)
