"""GET / DELETE /v1/sessions/{id}: a stored conversation."""

from __future__ import annotations

import asyncio
import re

from fastapi import APIRouter

from ..context import Server
from ..errors import ApiError
from ..schemas import SESSION_ID_PATTERN, SessionResponse


def check_session_id(session_id: str) -> None:
    if not re.fullmatch(SESSION_ID_PATTERN, session_id):
        raise ApiError(422, "session_id: 1 to 64 characters among A-Z a-z 0-9 _ -")


def turn_json(turn: dict, mood, assistant=None) -> dict:
    """A stored turn with every role's annotation, its mood (the `mood` role's, a
    roles.definition.RoleDefinition) also shown as that role shows it; a label the role no longer
    has is shown as stored, without an emoji."""
    noted = turn["annotations"].get(mood.name) or {}
    label = str(noted.get("label", ""))
    known = label in mood.label_names
    return {
        "seq": turn["seq"],
        "message": turn["message"],
        "sentiment": label,
        "probability": noted.get("probability"),
        "emoji": mood.label(label).emoji if known else "",
        "display": mood.shown(label) if known else label,
        "reply": turn["reply"],
        "annotations": turn["annotations"],
        # the page's line under the message: the other roles (the mood has its own line)
        "annotations_display": assistant.annotation_line(
            {name: noted.get("label") for name, noted in turn["annotations"].items() if name != mood.name}
        )
        if assistant is not None
        else "",
    }


def router(server: Server) -> APIRouter:
    routes = APIRouter()
    store = server.store

    @routes.get("/v1/sessions/{session_id}", tags=["api"], dependencies=server.auth(), response_model=SessionResponse)
    async def get_session(session_id: str):
        check_session_id(session_id)
        turns = await asyncio.to_thread(store.load, session_id)
        if turns is None:
            raise ApiError(404, f"no session {session_id!r} (never created, deleted or expired)", "not_found_error")
        return {
            "session_id": session_id,
            "turns": [turn_json(t, server.assistant.mood, server.assistant) for t in turns],
        }

    @routes.delete("/v1/sessions/{session_id}", tags=["api"], dependencies=server.auth())
    async def delete_session(session_id: str):
        check_session_id(session_id)
        if not await asyncio.to_thread(store.delete, session_id):
            raise ApiError(404, f"no session {session_id!r}", "not_found_error")
        return {"session_id": session_id, "deleted": True}

    return routes
