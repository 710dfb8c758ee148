"""Errors as the API answers them: always `{"error": {"message", "type"}}` with a fitting status."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..conversation.store import StoreError
from ..engine.base import ContextOverflow
from ..roles.inputs import InputError
from .schemas import ErrorResponse
from .worker import Busy, JobTimeout

log = logging.getLogger("allinone.server")
ERROR_RESPONSES = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 503, 504)}
_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request_error",
    503: "server_busy",
    504: "timeout",
}


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.headers = status, message, type_, headers or {}


def error_json(status: int, message: str, type_: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_}}, status_code=status, headers=headers)


def describe_validation(errors) -> tuple[int, str]:
    """Status and message for pydantic's validation errors: 400 for malformed JSON, else 422
    naming each field."""
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
    """What the client is told about an error raised on the inference worker."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, (InputError, ContextOverflow)):
        return ApiError(422, str(err))
    if isinstance(err, JobTimeout):
        return ApiError(504, str(err), "timeout")
    if isinstance(err, Busy):
        return ApiError(503, str(err), "server_busy", {"Retry-After": "5"})
    if isinstance(err, StoreError):
        log.warning("%s", err)
        return ApiError(
            503, "the session database is unavailable; try again", "store_unavailable", {"Retry-After": "5"}
        )
    return ApiError(500, f"internal error ({type(err).__name__})", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request, err: ApiError):
        return error_json(err.status, err.message, err.type, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, err: RequestValidationError):
        status, message = describe_validation(err.errors())
        return error_json(status, message, "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        return error_json(
            err.status_code, message, _STATUS_TYPES.get(err.status_code, "http_error"), getattr(err, "headers", None)
        )

    @app.exception_handler(StoreError)
    async def _store(request, err: StoreError):
        shown = as_api_error(err)
        return error_json(shown.status, shown.message, shown.type, shown.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_json(500, f"internal error ({type(err).__name__})", "server_error")
