"""`allinone serve --ray`: the same FastAPI app, one per Ray Serve replica, behind Serve's HTTP proxy.

Each replica loads its own model (with as many llama.cpp threads as CPUs it reserved) and builds
the app exactly as `allinone serve` does (`server.app.create_app`): its own inference worker and
queue, 503 when full, SSE streaming and cancellation. Serve's proxy listens on the configured
host and port and spreads requests over the replicas; a replica takes at most as many requests
as its worker can run or queue, and the proxy queues at most `queue_size` more, so when every
replica is full the client gets 503 rather than waiting behind an unbounded hidden queue. Sessions live in the
session database, which every replica opens (a SQLite file on one machine, PostgreSQL across
machines), so a conversation whose turns land on different replicas keeps its history.
"""

from __future__ import annotations

import os
import signal
import socket
import threading

from ..settings import Settings

APP_NAME = "allinone"
# Response header naming the replica that answered (host:pid): /healthz and /metrics describe
# that replica only, and a client or test can see which one it reached.
INSTANCE_HEADER = "x-allinone-instance"


def instance_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Replica:
    """One Serve replica: a model, a session store and the app, built once at replica start."""

    def __init__(self, settings: Settings):
        from ..server.app import create_app, open_store
        from ..service import Assistant

        # (prefixed: the ingress wrapper Serve puts around this class owns `app`)
        self._allinone_app = create_app(Assistant.load(settings), settings, store=open_store(settings))
        self._allinone_instance = instance_name().encode()

    def __serve_build_asgi_app__(self):
        app, instance = self._allinone_app, self._allinone_instance

        async def tagged(scope, receive, send):
            async def send_tagged(message):
                if message["type"] == "http.response.start":
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), (INSTANCE_HEADER.encode(), instance)],
                    }
                await send(message)

            await app(scope, receive, send_tagged if scope["type"] == "http" else send)

        return tagged


def deployment(settings: Settings, *, replicas: int | None, autoscale: tuple[int, int] | None):
    """The Serve application: `replicas` fixed replicas, or between autoscale[0] and [1]."""
    from ray import serve

    ingress = serve.ingress()(Replica)
    # running + waiting in the replica's own worker: the most it can hold without answering 503
    holds = settings.queue_size + 1
    options = dict(
        name="allinone",
        ray_actor_options={"num_cpus": settings.threads},
        max_ongoing_requests=holds,
        # Requests wait in the proxy's router while it picks a replica, so a bound of 1 already
        # turns away bursts of 4 clients; the replica's own queue size is the bound a user chose.
        max_queued_requests=settings.queue_size,
        health_check_period_s=10,
        graceful_shutdown_timeout_s=10,
    )
    if autoscale:
        low, high = autoscale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": low,
            # a replica counts as loaded once its worker has one request running and one waiting
            "target_ongoing_requests": 2,
        }
    else:
        options["num_replicas"] = replicas
    return serve.deployment(**options)(ingress).bind(settings)


def run(ray, settings: Settings, *, replicas: int | None, autoscale: tuple[int, int] | None) -> None:
    """Start Serve's proxy on settings.host:port with the replicas, and block until SIGINT/SIGTERM."""
    from ray import serve

    serve.start(http_options={"host": settings.host, "port": settings.port}, detached=False)
    serve.run(deployment(settings, replicas=replicas, autoscale=autoscale), name=APP_NAME, route_prefix="/")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(
        f"allinone on Ray Serve: {replicas or f'{autoscale[0]}..{autoscale[1]}'} replica(s) × "
        f"{settings.threads} thread(s) on http://{settings.host}:{settings.port}/",
        flush=True,
    )
    stop.wait()
    serve.shutdown()
