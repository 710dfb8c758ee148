"""POST /v1/analyze: several choice and extract roles for one text or a batch, sharing one pass
where their heads can; GET /v1/roles: the roles this service knows."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ...roles.definition import RoleError, parse_inline_role
from ..context import Server, choice_json, phrases_json
from ..errors import ApiError
from ..schemas import AnalyzeBatchResponse, AnalyzeRequest, AnalyzeResult, RolesResponse


def router(server: Server) -> APIRouter:
    routes = APIRouter()
    assistant = server.assistant

    @routes.get("/v1/roles", tags=["api"], dependencies=server.auth(), response_model=RolesResponse)
    async def roles():
        listing = []
        for role in assistant.roles.roles.values():
            choice = role.kind == "choice"
            head = None
            if choice:
                head = assistant.role_head(role) is not None
            elif role.kind == "extract":
                head = assistant.extract_role(role).head is not None
            listing.append(
                {
                    "name": role.name,
                    "kind": role.kind,
                    "description": role.description,
                    "labels": [
                        {"name": x.name, "description": x.description, "display": x.display, "emoji": x.emoji}
                        for x in role.labels
                    ],
                    # Looking a head up reads a small file once per role; it is cached afterwards.
                    "head": head,
                }
            )
        return {"roles": listing}

    @routes.post(
        "/v1/analyze",
        tags=["api"],
        dependencies=server.auth(),
        response_model=AnalyzeResult | AnalyzeBatchResponse,
    )
    async def analyze(body: AnalyzeRequest, request: Request):
        texts = server.checked_texts(body)
        definitions = []
        for i, role in enumerate(body.roles):
            try:
                definition = parse_inline_role(role) if isinstance(role, dict) else assistant.roles.get(role)
            except RoleError as err:
                raise ApiError(422 if isinstance(role, dict) else 404, f"roles[{i}]: {err}") from None
            if definition.kind not in ("choice", "extract"):
                raise ApiError(
                    422,
                    f"roles[{i}]: {definition.name!r} is a {definition.kind} role; analyze takes choice and "
                    "extract roles",
                )
            if definition.name in {d.name for d in definitions}:
                raise ApiError(422, f"roles[{i}]: role {definition.name!r} is asked twice")
            definitions.append(definition)

        def answer(text: str) -> dict:
            answers = assistant.analyze_roles(text, definitions)
            return {
                "roles": {
                    role.name: phrases_json(answers[role.name], role)
                    if role.kind == "extract"
                    else choice_json(answers[role.name], role, every_label=True)
                    for role in definitions
                }
            }

        results = await server.answer_each(request, texts, answer, "analyze")
        return results[0] if body.text is not None else {"results": results}

    return routes
