"""POST /v1/sentiment: the analyst, for one text or a batch."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..context import Server, choice_json
from ..schemas import SentimentBatchResponse, SentimentRequest, SentimentResult


def router(server: Server) -> APIRouter:
    routes = APIRouter()
    assistant = server.assistant

    @routes.post(
        "/v1/sentiment",
        tags=["api"],
        dependencies=server.auth(),
        response_model=SentimentResult | SentimentBatchResponse,
    )
    async def sentiment(body: SentimentRequest, request: Request):
        texts = server.checked_texts(body)
        results = await server.answer_each(
            request, texts, lambda text: choice_json(assistant.analyze(text), assistant.mood), "sentiment"
        )
        return results[0] if body.text is not None else {"results": results}

    return routes
