"""The OpenAI-compatible part: GET /v1/models, POST /v1/chat/completions (plain completions over
the caller's messages, with the model's chat template; no sentiment, no session)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from ...engine.base import Sampling
from ..context import Events, Server, sse
from ..errors import ApiError, as_api_error
from ..schemas import ChatCompletion, ChatCompletionRequest, ModelList
from ..worker import ERROR, Job


def router(server: Server) -> APIRouter:
    routes = APIRouter()
    settings = server.settings

    @routes.get("/v1/models", tags=["openai"], dependencies=server.auth(), response_model=ModelList)
    async def models():
        return {
            "object": "list",
            "data": [{"id": server.model_id, "object": "model", "created": server.created, "owned_by": "allinone"}],
        }

    @routes.post(
        "/v1/chat/completions",
        tags=["openai"],
        dependencies=server.auth(),
        response_model=ChatCompletion,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = []
        for i, m in enumerate(body.messages):
            text = m.text()
            if len(text) > settings.max_message_chars:
                raise ApiError(
                    422, f"messages.{i}.content: {len(text)} characters; the limit is {settings.max_message_chars}"
                )
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        defaults = server.assistant.completion_sampling()
        sampling = server.sampling(body, defaults, body.max_completion_tokens or body.max_tokens or defaults.max_tokens)
        stop = body.stop_strings()
        job = server.submit(lambda job: complete_job(server, messages, sampling, stop, job), "chat_completions")
        completion = Completion(
            server.model_id, include_usage=bool(body.stream_options and body.stream_options.include_usage)
        )
        if body.stream:
            return await server.stream(request, job, completion.frames)
        _, text, done = await server.reply_json(request, job)
        return completion.whole("".join(text), done)

    return routes


def complete_job(server: Server, messages: list[dict], sampling: Sampling, stop: list[str], job: Job) -> None:
    """On the worker: `start` (the prompt's token count), `delta` events, `done`."""
    stream, n_prompt = server.assistant.complete(messages, sampling=sampling, stop=stop, should_stop=job.should_stop)
    job.emit("start", n_prompt)
    for delta in stream:
        job.emit("delta", delta)
    finish = stream.finish_reason or "stop"
    if finish == "cancelled":
        server.metrics.count_cancelled()
        finish = "length"  # OpenAI has no "cancelled"; a timed-out reply was cut short
    server.metrics.add_tokens("chat_completions", n_prompt, len(stream.tokens))
    job.emit("done", {"finish_reason": finish, "prompt_tokens": n_prompt, "completion_tokens": len(stream.tokens)})


class Completion:
    """One chat completion's answer, whole or as chunks, in the OpenAI API's shapes."""

    def __init__(self, model_id: str, include_usage: bool):
        self.id, self.created, self.model = "chatcmpl-" + uuid.uuid4().hex, int(time.time()), model_id
        self.include_usage = include_usage

    @staticmethod
    def usage(done: dict) -> dict:
        return {
            "prompt_tokens": done["prompt_tokens"],
            "completion_tokens": done["completion_tokens"],
            "total_tokens": done["prompt_tokens"] + done["completion_tokens"],
        }

    def whole(self, text: str, done: dict) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": done["finish_reason"]}
            ],
            "usage": self.usage(done),
        }

    def chunk(self, delta: dict | None, finish: str | None = None, usage: dict | None = None) -> bytes:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        extra = {} if usage is None else {"usage": usage}
        return sse(
            None,
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": choices,
                **extra,
            },
        )

    async def frames(self, first, rest: Events):
        yield self.chunk({"role": "assistant", "content": ""})
        async for kind, data in rest:
            if kind == ERROR:
                err = as_api_error(data)
                yield sse(None, {"error": {"message": err.message, "type": err.type}})
            elif kind == "delta":
                yield self.chunk({"content": data})
            elif kind == "done":
                yield self.chunk({}, data["finish_reason"])
                if self.include_usage:
                    yield self.chunk(None, usage=self.usage(data))
        yield b"data: [DONE]\n\n"
