"""The web page, health and metrics."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse

from ..context import Server

STATIC = Path(__file__).resolve().parents[1] / "static"


def router(server: Server) -> APIRouter:
    routes = APIRouter()
    worker = server.worker

    @routes.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @routes.get("/healthz", tags=["service"])
    async def healthz():
        alive = worker.alive()
        body = {
            "status": "ok" if alive else "unhealthy",
            "model": server.model_id,
            "model_loaded": True,
            "worker_alive": alive,
            "busy": worker.busy(),
            "queue_depth": worker.depth(),
            "queue_size": worker.queue_size,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @routes.get("/metrics", tags=["service"], dependencies=server.auth(), response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return routes
