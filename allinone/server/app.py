"""The HTTP service: a thin adapter over `Assistant` (analyze, respond, complete).

Every model call runs on the single inference worker (see worker.py); routes only validate,
queue, and relay the worker's events to the client, as JSON or Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..conversation.history import Conversation
from ..conversation.store import SessionStore
from ..engine.base import ContextOverflow, Sampling
from ..roles.prompts import LABEL_DISPLAY
from ..roles.sentiment import InputError, Sentiment, validate_text
from ..settings import Settings
from .metrics import Metrics
from .schemas import (SESSION_ID_PATTERN, ChatCompletion, ChatCompletionRequest, ErrorResponse, ModelList,
                      RespondRequest, RespondResponse, SentimentBatchResponse, SentimentRequest, SentimentResult,
                      SessionResponse)
from .worker import ERROR, Busy, Job, JobTimeout, Worker

log = logging.getLogger("allinone.server")
STATIC = Path(__file__).parent / "static"
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
]
KNOWN_PATHS = {"/", "/healthz", "/metrics", "/v1/sentiment", "/v1/respond", "/v1/chat/completions", "/v1/models"}
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 503, 504)}


# ---- errors -------------------------------------------------------------------------------------

class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers or {}


def error_json(status: int, message: str, type_: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_}}, status_code=status, headers=headers)


_STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "method_not_allowed", 413: "request_too_large", 415: "unsupported_media_type",
                 422: "invalid_request_error", 503: "server_busy", 504: "timeout"}


def _describe_validation(errors) -> tuple[int, str]:
    for e in errors:
        if e.get("type") == "json_invalid":
            detail = (e.get("ctx") or {}).get("error", "")
            return 400, f"malformed JSON: {detail}".rstrip(": ")
    parts = []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        if e.get("type") == "missing" and loc:
            msg = "field required"
        elif e.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{where}: {msg}" if where else msg)
    return 422, "; ".join(parts) or "invalid request"


def as_api_error(err: BaseException) -> ApiError:
    if isinstance(err, ApiError):
        return err
    if isinstance(err, (InputError, ContextOverflow)):
        return ApiError(422, str(err))
    if isinstance(err, JobTimeout):
        return ApiError(504, str(err), "timeout")
    if isinstance(err, Busy):
        return ApiError(503, str(err), "server_busy", {"Retry-After": "5"})
    return ApiError(500, f"internal error ({type(err).__name__})", "server_error")


# ---- the ASGI guard: body limits, encoding, content type, security headers, metrics ----------------

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
                scope["path"] if scope["path"] in KNOWN_PATHS else
                "/static" if scope["path"].startswith("/static/") else "other")
            self.metrics.observe_request(label, scope["method"], status["code"], time.perf_counter() - start)

    async def _check_body(self, scope, receive):
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        too_big = error_json(413, f"request body larger than {self.max_body} bytes", "request_too_large")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return too_big, receive
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope["path"].startswith("/v1/") and not (ctype == "application/json" or ctype.endswith("+json")):
            return error_json(415, "send the body as JSON with `Content-Type: application/json`",
                              "unsupported_media_type"), receive
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
            return error_json(400, f"request body is not valid UTF-8 (byte {err.start})", "invalid_request_error"), \
                receive
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: disconnect notices, as the server sends them

        return None, replay


# ---- helpers ------------------------------------------------------------------------------------

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
        raise ValueError(f"refusing to listen on {settings.host}: binding beyond loopback requires an API key "
                         "(set ALLINONE_API_KEY; clients send `Authorization: Bearer <key>`)")


def sentiment_json(s: Sentiment) -> dict:
    shown = LABEL_DISPLAY[s.label]
    return {"label": s.label, "probability": None if s.probability is None else round(s.probability, 6),
            "latency_ms": round(s.latency_ms, 2), "truncated": s.truncated, "emoji": shown["emoji"],
            "display": f"{shown['emoji']} LLM 情感判断: {shown['zh']}"}


def sse(event: str | None, data: Any) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return (head + f"data: {payload}\n\n").encode("utf-8")


async def _watch_disconnect(request: Request, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


@contextlib.asynccontextmanager
async def watching(request: Request, job: Job):
    """Cancel `job` as soon as the client disconnects, and whenever we stop relaying it."""
    watcher = asyncio.create_task(_watch_disconnect(request, job))
    try:
        yield
    finally:
        watcher.cancel()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---- the app ------------------------------------------------------------------------------------

def create_app(assistant, settings: Settings, *, store: SessionStore | None = None) -> FastAPI:
    metrics = Metrics()
    worker = Worker(settings.queue_size, settings.request_timeout)
    store = store or SessionStore(settings.resolved_session_db(), max_turns=settings.session_max_turns,
                                  idle_seconds=settings.session_idle_hours * 3600)
    model_id = assistant.model_path.stem if assistant.model_path else "allinone"
    created = int(time.time())
    api_key = settings.api_key.get_secret_value() if settings.api_key else ""
    metrics.gauge("allinone_queue_depth", "Requests waiting for the model.", worker.depth)
    metrics.gauge("allinone_queue_size", "Capacity of the wait queue.", lambda: worker.queue_size)
    metrics.gauge("allinone_worker_busy", "1 while the model is computing.", lambda: int(worker.busy()))
    metrics.gauge("allinone_worker_alive", "1 while the inference worker runs.", lambda: int(worker.alive()))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            await asyncio.to_thread(worker.stop)
            store.close()

    # No /docs or /redoc: they load their assets from a CDN. The schema is at /openapi.json.
    app = FastAPI(title="allinone", version="0.1.0", lifespan=lifespan, responses=ERROR_RESPONSES,
                  docs_url=None, redoc_url=None,
                  description="Sentiment analysis and empathetic chat with one small Qwen model on CPU.")
    app.state.worker, app.state.store, app.state.metrics = worker, store, metrics

    if settings.cors_origins.strip():
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=[o.strip() for o in settings.cors_origins.split(",")
                                                          if o.strip()],
                           allow_methods=["GET", "POST", "DELETE"], allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(Guard, settings=settings, metrics=metrics)

    # ---- error handlers ----
    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return error_json(err.status, err.message, err.type, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err: RequestValidationError):
        status, message = _describe_validation(err.errors())
        return error_json(status, message, "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        return error_json(err.status_code, message, _STATUS_TYPES.get(err.status_code, "http_error"),
                          getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_json(500, f"internal error ({type(err).__name__})", "server_error")

    # ---- auth ----
    async def authorized(request: Request) -> None:
        if not api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send `Authorization: Bearer <key>`)",
                           "authentication_error", {"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorized)]

    def submit(fn, name: str) -> Job:
        try:
            return worker.submit(fn, name=name)
        except Busy as err:
            metrics.count_rejected()
            raise ApiError(503, str(err), "server_busy", {"Retry-After": str(worker.retry_after())}) from None

    async def first_event(job: Job) -> tuple[str, Any]:
        kind, data = await job.next_event()
        if kind == ERROR:
            raise as_api_error(data)
        if kind == "end":
            raise ApiError(499, "the client went away", "cancelled")
        return kind, data

    async def collect_reply(job: Job) -> tuple[list[str], dict]:
        """For a non-streaming answer: the job's text deltas and its `done` event."""
        deltas, done = [], None
        async for kind, data in job.events_until_end():
            if kind == ERROR:
                raise as_api_error(data)
            if kind == "delta":
                deltas.append(data)
            elif kind == "done":
                done = data
        if done is None:
            raise ApiError(499, "the client went away", "cancelled")
        return deltas, done

    # ---- page, health, metrics ----
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", tags=["service"])
    async def healthz():
        alive = worker.alive()
        body = {"status": "ok" if alive else "unhealthy", "model": model_id, "model_loaded": True,
                "worker_alive": alive, "busy": worker.busy(), "queue_depth": worker.depth(),
                "queue_size": worker.queue_size}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics", tags=["service"], dependencies=auth, response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---- sentiment ----
    @app.post("/v1/sentiment", tags=["api"], dependencies=auth,
              response_model=SentimentResult | SentimentBatchResponse)
    async def sentiment(body: SentimentRequest, request: Request):
        texts = [body.text] if body.text is not None else body.texts
        if len(texts) > settings.max_batch_texts:
            raise ApiError(422, f"texts: {len(texts)} texts; the limit is {settings.max_batch_texts} per request")
        for i, text in enumerate(texts):
            try:
                validate_text(text, settings.max_text_chars)
            except InputError as err:
                raise ApiError(422, f"texts[{i}]: {err}" if body.texts is not None else f"text: {err}") from None

        def run(job: Job):
            results = []
            for text in texts:
                if job.should_stop():
                    if job.timed_out():
                        raise JobTimeout("the request timed out")
                    return
                results.append(sentiment_json(assistant.analyze(text)))
            job.emit("result", results)

        job = submit(run, "sentiment")
        async with watching(request, job):
            _, results = await first_event(job)
        return results[0] if body.text is not None else {"results": results}

    # ---- respond ----
    @app.post("/v1/respond", tags=["api"], dependencies=auth, response_model=RespondResponse,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def respond(body: RespondRequest, request: Request):
        try:
            validate_text(body.message, settings.max_message_chars)
        except InputError as err:
            raise ApiError(422, f"message: {str(err).replace('text', 'message', 1)}") from None
        session_id = body.session_id or uuid.uuid4().hex
        defaults = assistant.default_sampling()
        # The reply's own guards (repetition penalty, no-repeat rule) stay as configured; a request
        # sets only what it names.
        sampling = dataclasses.replace(
            defaults, max_tokens=min(body.max_tokens or defaults.max_tokens, settings.reply_max_tokens),
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_p=defaults.top_p if body.top_p is None else body.top_p, seed=body.seed)

        def run(job: Job):
            turns = store.turns(session_id)
            conversation = Conversation(turns=turns)
            response = assistant.respond(conversation, body.message, sampling=sampling, should_stop=job.should_stop)
            shown = sentiment_json(response.sentiment)
            job.emit("sentiment", {"session_id": session_id, **shown})
            for delta in response:
                job.emit("delta", delta)
            stats = response.stats
            finish = stats.finish_reason or "stop"
            stored = len(conversation.turns) - 1
            turn = conversation.turns[-1]
            if turn.reply or finish != "cancelled":
                stored = store.commit_turn(session_id, turn, probability=response.sentiment.probability,
                                           dropped=stats.dropped_turns)
            if finish == "cancelled":
                metrics.count_cancelled()
                if job.timed_out():
                    finish = "timeout"
            metrics.add_tokens("respond", stats.prompt_tokens, stats.completion_tokens)
            job.emit("done", {
                "session_id": session_id, "finish_reason": finish, "dropped_turns": stats.dropped_turns,
                "turns": stored,
                "usage": {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
                          "total_tokens": stats.prompt_tokens + stats.completion_tokens,
                          "cached_tokens": stats.cached_tokens},
                "timings": {"time_to_first_token_ms": None if stats.time_to_first_token_ms is None
                            else round(stats.time_to_first_token_ms, 2), "total_ms": round(stats.total_ms, 2)}})

        job = submit(run, "respond")
        if not body.stream:
            async with watching(request, job):
                _, shown = await first_event(job)
                reply, done = await collect_reply(job)
            shown.pop("session_id")
            return {**done, "sentiment": shown, "reply": "".join(reply)}

        watch = watching(request, job)
        await watch.__aenter__()
        try:
            first = await first_event(job)
        except BaseException:
            await watch.__aexit__(None, None, None)
            raise

        async def events() -> AsyncIterator[bytes]:
            try:
                yield sse(*first)
                async for kind, data in job.events_until_end():
                    if kind == ERROR:
                        err = as_api_error(data)
                        yield sse("error", {"error": {"message": err.message, "type": err.type}})
                    elif kind == "delta":
                        yield sse("delta", {"text": data})
                    else:
                        yield sse(kind, data)
            finally:
                job.cancel()
                await watch.__aexit__(None, None, None)

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    # ---- sessions ----
    @app.get("/v1/sessions/{session_id}", tags=["api"], dependencies=auth, response_model=SessionResponse)
    async def get_session(session_id: str):
        _check_session_id(session_id)
        turns = await asyncio.to_thread(store.load, session_id)
        if turns is None:
            raise ApiError(404, f"no session {session_id!r} (never created, deleted or expired)", "not_found_error")
        out = []
        for t in turns:
            shown = LABEL_DISPLAY.get(t["sentiment"], LABEL_DISPLAY["positive"])
            out.append({"message": t["message"], "sentiment": t["sentiment"], "probability": t["probability"],
                        "emoji": shown["emoji"], "display": f"{shown['emoji']} LLM 情感判断: {shown['zh']}",
                        "reply": t["reply"]})
        return {"session_id": session_id, "turns": out}

    @app.delete("/v1/sessions/{session_id}", tags=["api"], dependencies=auth)
    async def delete_session(session_id: str):
        _check_session_id(session_id)
        if not await asyncio.to_thread(store.delete, session_id):
            raise ApiError(404, f"no session {session_id!r}", "not_found_error")
        return {"session_id": session_id, "deleted": True}

    # ---- OpenAI-compatible ----
    @app.get("/v1/models", tags=["openai"], dependencies=auth, response_model=ModelList)
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "allinone"}]}

    @app.post("/v1/chat/completions", tags=["openai"], dependencies=auth, response_model=ChatCompletion,
              responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = []
        for i, m in enumerate(body.messages):
            text = m.text()
            if len(text) > settings.max_message_chars:
                raise ApiError(422, f"messages.{i}.content: {len(text)} characters; the limit is "
                                    f"{settings.max_message_chars}")
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        defaults = assistant.default_sampling()
        max_tokens = body.max_completion_tokens or body.max_tokens or defaults.max_tokens
        sampling = Sampling(max_tokens=max_tokens,
                            temperature=defaults.temperature if body.temperature is None else body.temperature,
                            top_p=defaults.top_p if body.top_p is None else body.top_p, seed=body.seed)
        stop = body.stop_strings()

        def run(job: Job):
            stream, n_prompt = assistant.complete(messages, sampling=sampling, stop=stop, should_stop=job.should_stop)
            job.emit("start", n_prompt)
            for delta in stream:
                job.emit("delta", delta)
            finish = stream.finish_reason or "stop"
            if finish == "cancelled":
                metrics.count_cancelled()
                finish = "length"  # OpenAI has no "cancelled"; a timed-out reply was cut short
            metrics.add_tokens("chat_completions", n_prompt, len(stream.tokens))
            job.emit("done", {"finish_reason": finish, "prompt_tokens": n_prompt,
                              "completion_tokens": len(stream.tokens)})

        job = submit(run, "chat_completions")
        completion_id = "chatcmpl-" + uuid.uuid4().hex
        now = int(time.time())

        def usage(done):
            return {"prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                    "total_tokens": done["prompt_tokens"] + done["completion_tokens"]}

        if not body.stream:
            async with watching(request, job):
                await first_event(job)
                text, done = await collect_reply(job)
            return {"id": completion_id, "object": "chat.completion", "created": now, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "finish_reason": done["finish_reason"]}],
                    "usage": usage(done)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        watch = watching(request, job)
        await watch.__aenter__()
        try:
            await first_event(job)
        except BaseException:
            await watch.__aexit__(None, None, None)
            raise

        def chunk(delta: dict, finish: str | None, **extra) -> bytes:
            return sse(None, {"id": completion_id, "object": "chat.completion.chunk", "created": now,
                              "model": model_id, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                              **extra})

        async def events() -> AsyncIterator[bytes]:
            try:
                yield chunk({"role": "assistant", "content": ""}, None)
                async for kind, data in job.events_until_end():
                    if kind == ERROR:
                        err = as_api_error(data)
                        yield sse(None, {"error": {"message": err.message, "type": err.type}})
                    elif kind == "delta":
                        yield chunk({"content": data}, None)
                    elif kind == "done":
                        yield chunk({}, data["finish_reason"])
                        if include_usage:
                            yield sse(None, {"id": completion_id, "object": "chat.completion.chunk", "created": now,
                                             "model": model_id, "choices": [], "usage": usage(data)})
                yield b"data: [DONE]\n\n"
            finally:
                job.cancel()
                await watch.__aexit__(None, None, None)

        return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)

    return app


def _check_session_id(session_id: str) -> None:
    import re

    if not re.fullmatch(SESSION_ID_PATTERN, session_id):
        raise ApiError(422, "session_id: 1 to 64 characters among A-Z a-z 0-9 _ -")


def serve(assistant, settings: Settings) -> None:
    """Run the server until interrupted (the model is already loaded)."""
    import uvicorn

    check_bind(settings)
    app = create_app(assistant, settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=5,
                access_log=False)
