"""POST /v1/respond: the respond flow (sentiment first, then the reply), within a stored session."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request

from ...conversation.history import Conversation
from ...engine.base import Sampling
from ...roles.inputs import InputError, validate_text
from ..context import Events, Server, choice_json, sse
from ..errors import ApiError, as_api_error
from ..schemas import RespondRequest, RespondResponse
from ..worker import ERROR, Job


def router(server: Server) -> APIRouter:
    routes = APIRouter()
    settings = server.settings

    @routes.post(
        "/v1/respond",
        tags=["api"],
        dependencies=server.auth(),
        response_model=RespondResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def respond(body: RespondRequest, request: Request):
        try:
            validate_text(body.message, settings.max_message_chars)
        except InputError as err:
            raise ApiError(422, f"message: {str(err).replace('text', 'message', 1)}") from None
        session_id = body.session_id or uuid.uuid4().hex
        # The reply's own guards (repetition penalty, no-repeat and copy rules) stay as configured.
        defaults = server.assistant.default_sampling()
        sampling = server.sampling(
            body, defaults, min(body.max_tokens or defaults.max_tokens, settings.reply_max_tokens)
        )
        job = server.submit(lambda job: respond_job(server, session_id, body.message, sampling, job), "respond")
        if body.stream:
            return await server.stream(request, job, respond_frames)
        (_, shown), reply, done = await server.reply_json(request, job)
        shown.pop("session_id")
        return {**done, "sentiment": shown, "reply": "".join(reply)}

    return routes


async def respond_frames(first, rest: Events):
    yield sse(*first)
    async for kind, data in rest:
        if kind == ERROR:
            err = as_api_error(data)
            yield sse("error", {"error": {"message": err.message, "type": err.type}})
        elif kind == "delta":
            yield sse("delta", {"text": data})
        else:
            yield sse(kind, data)


def annotations_json(assistant, annotations: dict) -> dict:
    """The message's other roles (settings.chat_roles): each as the API shows a choice, and the
    line the page shows under the message (`😢 悲伤 · 倾诉`)."""
    return {
        "roles": {name: choice_json(choice, assistant.roles.get(name)) for name, choice in annotations.items()},
        "display": assistant.annotation_line({name: choice.label for name, choice in annotations.items()}),
    }


def respond_job(server: Server, session_id: str, message: str, sampling: Sampling, job: Job) -> None:
    """On the worker: `sentiment`, then `delta` events, then `done` once the turn is committed (a
    turn interrupted before any reply text is not stored)."""
    store, metrics = server.store, server.metrics
    conversation = Conversation(turns=store.turns(session_id, server.assistant.mood.name))
    response = server.assistant.respond(conversation, message, sampling=sampling, should_stop=job.should_stop)
    assistant = server.assistant
    job.emit("sentiment", {"session_id": session_id, **choice_json(response.sentiment, assistant.mood)})
    annotations = None

    def announce():  # once, as soon as the flow has them (after the first delta)
        nonlocal annotations
        if annotations is None and response.annotations is not None:
            annotations = annotations_json(assistant, response.annotations)
            if response.annotations:  # no chat roles: no event
                job.emit("annotations", annotations)

    for delta in response:
        job.emit("delta", delta)
        announce()
    announce()
    stats = response.stats
    finish = stats.finish_reason or "stop"
    stored = len(conversation.turns) - 1
    turn = conversation.turns[-1]
    if turn.reply or finish != "cancelled":
        stored = store.commit_turn(session_id, turn, dropped=stats.dropped_turns)
    if finish == "cancelled":
        metrics.count_cancelled()
        if job.timed_out():
            finish = "timeout"
    metrics.add_tokens("respond", stats.prompt_tokens, stats.completion_tokens)
    first_token = stats.time_to_first_token_ms
    job.emit(
        "done",
        {
            "session_id": session_id,
            "annotations": annotations or {"roles": {}, "display": ""},
            "finish_reason": finish,
            "dropped_turns": stats.dropped_turns,
            "turns": stored,
            "usage": {
                "prompt_tokens": stats.prompt_tokens,
                "completion_tokens": stats.completion_tokens,
                "total_tokens": stats.prompt_tokens + stats.completion_tokens,
                "cached_tokens": stats.cached_tokens,
            },
            "timings": {
                "time_to_first_token_ms": None if first_token is None else round(first_token, 2),
                "total_ms": round(stats.total_ms, 2),
            },
        },
    )
