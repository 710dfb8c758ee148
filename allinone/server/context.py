"""What every route may use: the assistant, the inference worker and the session store, and the
helpers that turn a worker job into an HTTP answer (JSON or Server-Sent Events)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, Request
from fastapi.responses import StreamingResponse

from ..conversation.store import SessionStore
from ..engine.base import Sampling
from ..roles.inputs import InputError, validate_text
from ..settings import Settings
from .errors import ApiError, as_api_error
from .metrics import Metrics
from .worker import ERROR, Busy, Job, JobTimeout, Worker

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Events = AsyncIterator[tuple[str, Any]]


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


@dataclass
class Server:
    assistant: Any  # service.Assistant
    settings: Settings
    worker: Worker
    store: SessionStore
    metrics: Metrics = field(default_factory=Metrics)
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_id(self) -> str:
        path = self.assistant.model_path
        return path.stem if path else "allinone"

    # ---- auth ----
    def auth(self) -> list:
        """The dependency list of a protected route: with an API key set, `Authorization: Bearer <key>`."""
        key = self.settings.api_key.get_secret_value() if self.settings.api_key else ""

        async def authorized(request: Request) -> None:
            if not key:
                return
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                raise ApiError(
                    401,
                    "missing or wrong API key (send `Authorization: Bearer <key>`)",
                    "authentication_error",
                    {"WWW-Authenticate": "Bearer"},
                )

        return [Depends(authorized)]

    # ---- requests ----
    def sampling(self, body, base: Sampling, max_tokens: int) -> Sampling:
        """`base` with what the request names (temperature, top_p, seed) and the reply length."""
        return dataclasses.replace(
            base,
            max_tokens=max_tokens,
            seed=body.seed,
            temperature=base.temperature if body.temperature is None else body.temperature,
            top_p=base.top_p if body.top_p is None else body.top_p,
        )

    # ---- jobs ----
    def submit(self, fn: Callable[[Job], None], name: str) -> Job:
        try:
            return self.worker.submit(fn, name=name)
        except Busy as err:
            self.metrics.count_rejected()
            raise ApiError(503, str(err), "server_busy", {"Retry-After": str(self.worker.retry_after())}) from None

    def checked_texts(self, body) -> list[str]:
        """A schemas.TextsRequest's text or texts, each checked as the roles check it: 422 naming
        the one that is not usable, before any work is queued."""
        texts = [body.text] if body.text is not None else body.texts
        limit = self.settings.max_batch_texts
        if len(texts) > limit:
            raise ApiError(422, f"texts: {len(texts)} texts; the limit is {limit} per request")
        for i, text in enumerate(texts):
            try:
                validate_text(text, self.settings.max_text_chars)
            except InputError as err:
                raise ApiError(422, f"texts[{i}]: {err}" if body.texts is not None else f"text: {err}") from None
        return texts

    async def answer_each(self, request: Request, texts: list[str], answer: Callable[[str], Any], name: str) -> list:
        """answer(text) for every text on the worker, delivered as one `result` event (none if the
        client went away; a timeout between texts ends the job)."""

        def run(job: Job) -> None:
            results = []
            for text in texts:
                if job.should_stop():
                    if job.timed_out():
                        raise JobTimeout("the request timed out")
                    return
                results.append(answer(text))
            job.emit("result", results)

        job = self.submit(run, name)
        async with watching(request, job):
            _, results = await self.first_event(job)
        return results

    @staticmethod
    async def first_event(job: Job) -> tuple[str, Any]:
        kind, data = await job.next_event()
        if kind == ERROR:
            raise as_api_error(data)
        if kind == "end":
            raise ApiError(499, "the client went away", "cancelled")
        return kind, data

    @staticmethod
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

    async def reply_json(self, request: Request, job: Job) -> tuple[tuple[str, Any], list[str], dict]:
        """A whole reply, as a JSON answer needs it: the first event, the text deltas, `done`."""
        async with watching(request, job):
            first = await self.first_event(job)
            deltas, done = await self.collect_reply(job)
        return first, deltas, done

    async def stream(
        self, request: Request, job: Job, frames: Callable[[tuple[str, Any], Events], AsyncIterator[bytes]]
    ) -> StreamingResponse:
        """Relay a job as Server-Sent Events. Its first event is awaited before answering, so an
        error raised before it (busy, bad input) is still a plain HTTP error; `frames(first,
        rest)` renders the events. The job is cancelled when the client goes or the stream ends."""
        watch = watching(request, job)
        await watch.__aenter__()
        try:
            first = await self.first_event(job)
        except BaseException:
            await watch.__aexit__(None, None, None)
            raise

        async def body() -> AsyncIterator[bytes]:
            try:
                async for frame in frames(first, job.events_until_end()):
                    yield frame
            finally:
                job.cancel()
                await watch.__aexit__(None, None, None)

        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


def phrases_json(phrases, role) -> dict:
    """A roles.extract.Phrases of an extract role as the API shows it."""
    title = role.title.get("zh") or role.name
    return {
        "phrases": phrases.phrases,
        "scores": phrases.scores,
        "latency_ms": round(phrases.latency_ms, 2),
        "truncated": phrases.truncated,
        "display": f"🔑 {title}: {' · '.join(phrases.phrases[:5])}",
    }


def choice_json(choice, role, *, every_label: bool = False) -> dict:
    """A roles.choice.Choice of a role (a roles.definition.RoleDefinition) as the API shows it;
    `every_label`: with every label's probability."""
    shown = {
        "label": choice.label,
        "probability": None if choice.probability is None else round(choice.probability, 6),
        "latency_ms": round(choice.latency_ms, 2),
        "truncated": choice.truncated,
        "emoji": role.label(choice.label).emoji,
        "display": role.shown(choice.label),
    }
    if every_label:
        shown["probabilities"] = {label: round(p, 6) for label, p in choice.probabilities.items()}
    return shown
