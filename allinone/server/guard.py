"""The outermost ASGI layer: body limits, encoding and content type, security headers, metrics."""

from __future__ import annotations

import time

from fastapi.responses import Response

from ..settings import Settings
from .errors import error_json
from .metrics import Metrics

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    ),
]
# Paths recorded under their own name in the metrics when no route matched them (e.g. a 413).
KNOWN_PATHS = {"/", "/healthz", "/metrics", "/v1/sentiment", "/v1/respond", "/v1/chat/completions", "/v1/models"}


class Guard:
    """Outermost layer. Rejects oversized bodies (413), non-JSON POSTs to the API (415, which also
    keeps other sites' plain form posts out), bodies that are not UTF-8 (400); adds security headers;
    records each request's route, status and duration."""

    def __init__(self, app, settings: Settings, metrics: Metrics):
        self.app, self.max_body, self.metrics = app, settings.max_body_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        try:
            rejection = None
            if scope["method"] in ("POST", "PUT", "PATCH"):
                rejection, receive = await self._check_body(scope, receive)
            if rejection is not None:
                await rejection(scope, receive, send_wrapper)
            else:
                await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or (
                scope["path"]
                if scope["path"] in KNOWN_PATHS
                else "/static"
                if scope["path"].startswith("/static/")
                else "other"
            )
            self.metrics.observe_request(label, scope["method"], status["code"], time.perf_counter() - start)

    async def _check_body(self, scope, receive):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        too_big = error_json(413, f"request body larger than {self.max_body} bytes", "request_too_large")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return too_big, receive
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope["path"].startswith("/v1/") and not (ctype == "application/json" or ctype.endswith("+json")):
            return error_json(
                415, "send the body as JSON with `Content-Type: application/json`", "unsupported_media_type"
            ), receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return Response(status_code=499), receive
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return too_big, receive
            chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as err:
            return error_json(
                400, f"request body is not valid UTF-8 (byte {err.start})", "invalid_request_error"
            ), receive
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: disconnect notices, as the server sends them

        return None, replay
