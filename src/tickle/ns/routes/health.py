"""Liveness and Prometheus metrics (no credentials)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import PlainTextResponse

from tickle import messages as m
from tickle.ns.dependencies import MetricsDep
from tickle.serving import JsonRoute, MetricNames

router = APIRouter(tags=["health"], route_class=JsonRoute)


@router.get("/health", summary="Liveness")
def health() -> m.Health:
    return m.Health(component="ns")


@router.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
def prometheus(metrics: MetricsDep, names: MetricNames = []) -> Response:  # noqa: B006
    body, content_type = metrics.render(names)
    return Response(body, media_type=content_type)
