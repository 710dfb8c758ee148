"""POST /v1/sentiment: the analyst, for one text or a batch."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ...roles.inputs import InputError, validate_text
from ..context import Server, choice_json, watching
from ..errors import ApiError
from ..schemas import SentimentBatchResponse, SentimentRequest, SentimentResult
from ..worker import Job, JobTimeout


def router(server: Server) -> APIRouter:
    routes = APIRouter()
    settings = server.settings

    @routes.post(
        "/v1/sentiment",
        tags=["api"],
        dependencies=server.auth(),
        response_model=SentimentResult | SentimentBatchResponse,
    )
    async def sentiment(body: SentimentRequest, request: Request):
        texts = [body.text] if body.text is not None else body.texts
        if len(texts) > settings.max_batch_texts:
            raise ApiError(422, f"texts: {len(texts)} texts; the limit is {settings.max_batch_texts} per request")
        for i, text in enumerate(texts):
            try:
                validate_text(text, settings.max_text_chars)
            except InputError as err:
                raise ApiError(422, f"texts[{i}]: {err}" if body.texts is not None else f"text: {err}") from None
        job = server.submit(lambda job: analyze_all(server, texts, job), "sentiment")
        async with watching(request, job):
            _, results = await server.first_event(job)
        return results[0] if body.text is not None else {"results": results}

    return routes


def analyze_all(server: Server, texts: list[str], job: Job) -> None:
    """On the worker: every text's sentiment, as one `result` event (none if the client went)."""
    results = []
    for text in texts:
        if job.should_stop():
            if job.timed_out():
                raise JobTimeout("the request timed out")
            return
        results.append(choice_json(server.assistant.analyze(text), server.assistant.mood))
    job.emit("result", results)
