"""The HTTP service: a thin adapter over `Assistant` (analyze, respond, complete).

Every model call runs on the single inference worker (see worker.py); routes only validate,
queue, and relay the worker's events to the client, as JSON or Server-Sent Events. The routes
live in routes/, one module per area, over what context.py shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from ..conversation.store import SessionStore
from ..machine import peak_rss_mb, rss_mb
from ..settings import Settings
from .context import Server
from .errors import ERROR_RESPONSES, install_error_handlers
from .guard import Guard
from .routes import analyze, openai, page, respond, sentiment, sessions
from .worker import Worker


def package_version() -> str:
    try:
        return version("allinone")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings) -> None:
    """Refuse to listen beyond loopback without an API key."""
    if not is_loopback(settings.host) and not (settings.api_key and settings.api_key.get_secret_value()):
        raise ValueError(
            f"refusing to listen on {settings.host}: binding beyond loopback requires an API key "
            "(set ALLINONE_API_KEY; clients send `Authorization: Bearer <key>`)"
        )


def open_store(settings: Settings) -> SessionStore:
    """The configured session store, reachable and with its schema (raises StoreError)."""
    return SessionStore(
        settings.resolved_session_db(),
        max_turns=settings.session_max_turns,
        idle_seconds=settings.session_idle_hours * 3600,
    )


def create_app(assistant, settings: Settings, *, store: SessionStore | None = None) -> FastAPI:
    store = store or open_store(settings)
    server = Server(
        assistant=assistant,
        settings=settings,
        store=store,
        worker=Worker(settings.queue_size, settings.request_timeout),
        created=int(time.time()),
    )
    worker, metrics = server.worker, server.metrics
    metrics.gauge("allinone_queue_depth", "Requests waiting for the model.", worker.depth)
    metrics.gauge("allinone_queue_size", "Capacity of the wait queue.", lambda: worker.queue_size)
    metrics.gauge("allinone_worker_busy", "1 while the model is computing.", lambda: int(worker.busy()))
    metrics.gauge("allinone_worker_alive", "1 while the inference worker runs.", lambda: int(worker.alive()))
    metrics.gauge("process_resident_memory_bytes", "Resident memory of this process.", lambda: rss_mb() * 2**20)
    metrics.gauge(
        "allinone_peak_resident_memory_bytes",
        "The most resident memory this process has held.",
        lambda: peak_rss_mb() * 2**20,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)
            store.close()

    # No /docs or /redoc: they load their assets from a CDN. The schema is at /openapi.json.
    app = FastAPI(
        title="allinone",
        version=package_version(),
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
        docs_url=None,
        redoc_url=None,
        description="Sentiment analysis and empathetic chat with one small Qwen model on CPU.",
    )
    app.state.server = server
    if settings.cors_origins.strip():
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=[o.strip() for o in settings.cors_origins.split(",") if o.strip()],
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(Guard, settings=settings, metrics=metrics)
    install_error_handlers(app)
    for area in (page, sentiment, analyze, respond, sessions, openai):
        app.include_router(area.router(server))
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    return app


def serve(assistant, settings: Settings, *, store: SessionStore | None = None) -> None:
    """Run the server until interrupted (the model is already loaded)."""
    import uvicorn

    check_bind(settings)
    app = create_app(assistant, settings, store=store)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=5, access_log=False
    )
