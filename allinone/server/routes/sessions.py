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


def annotations_line(turn: dict, roles, mood) -> str:
    """The page's line under a stored message: its other roles as each shows its label (a role
    or label no longer known is skipped)."""
    parts = []
    for name, noted in turn["annotations"].items():
        role = roles.roles.get(name)
        if name == mood.name or role is None or noted.get("label") not in role.label_names:
            continue
        label = role.label(noted["label"])
        parts.append(f"{label.emoji} {label.shown('zh')}".strip() if not parts else label.shown("zh"))
    return " · ".join(parts)


def turn_json(turn: dict, mood, roles=None) -> dict:
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
        "annotations_display": annotations_line(turn, roles, mood) if roles is not None else "",
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
            "turns": [turn_json(t, server.assistant.mood, server.assistant.roles) for t in turns],
        }

    @routes.delete("/v1/sessions/{session_id}", tags=["api"], dependencies=server.auth())
    async def delete_session(session_id: str):
        check_session_id(session_id)
        if not await asyncio.to_thread(store.delete, session_id):
            raise ApiError(404, f"no session {session_id!r}", "not_found_error")
        return {"session_id": session_id, "deleted": True}

    return routes
