"""One error shape for every 4xx and 5xx: {"error": {"type", "code", "message", "param"}}."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tasks.db import stale_plan

log = logging.getLogger("agentpay.api")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.type = type_
        self.param = param
        self.headers = headers


def error_body(type_: str, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"type": type_, "code": code, "message": message, "param": param}}


def not_found(what: str = "payment", param: str = "id") -> ApiError:
    """404 for the resource named by `param` (the path's id, or a query parameter)."""
    return ApiError(404, "resource_missing", f"No such {what}", param=param)


_STATUS_CODES = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "unauthorized"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "resource_missing"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("idempotency_error", "conflict"),
    413: ("invalid_request_error", "body_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limited"),
}


# What each error status means on this API, for the OpenAPI document (`responses(...)`).
_DESCRIPTIONS = {
    400: "Invalid request: a parameter, the body or a header is missing or invalid",
    401: "Missing, invalid or revoked API key",
    403: "This route needs an operator key",
    404: "No such payment (or it belongs to another agent)",
    409: "The Idempotency-Key was used with other parameters, or the payment's state "
    "does not allow this",
    413: "The body is larger than the server accepts",
    415: "The body is not sent as JSON (Content-Type: application/json)",
    429: "Too many requests from this agent: wait Retry-After seconds",
    500: "An internal error (nothing about it is disclosed)",
    503: "The database is not available (or a secret is not set): try again after "
    "Retry-After seconds, with the same Idempotency-Key",
}

# FastAPI's 400 for a body its JSON parser raised on with anything but a syntax error.
_BODY_UNREADABLE = "There was an error parsing the body"

# How long a client should wait before trying again after a 503.
RETRY_AFTER_SECONDS = 1


def responses(
    *codes: int, described: dict[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the given error statuses, all in the one error shape
    (`described` overrides the generic description of a status for a route)."""
    from api.models import ErrorResponse

    found: dict[int | str, dict[str, Any]] = {}
    # Every route that answers with an error needs the database, which can be away.
    for code in (*codes, 503):
        description = (described or {}).get(code, _DESCRIPTIONS[code])
        entry: dict[str, Any] = {"model": ErrorResponse, "description": description}
        if code in (429, 503):
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before trying again",
                    "schema": {"type": "integer"},
                }
            }
        found[code] = entry
    return found


# Patterns a value must match, said in words (docs/api.md's) rather than as the regular
# expression, by param.
PATTERN_RULES = {
    "Idempotency-Key": "must be printable ASCII, no spaces, at most 255 characters (and not empty)",
}


def _param(loc: tuple[Any, ...]) -> str | None:
    if loc[:1] in (("query",), ("header",)) and len(loc) > 1:
        return str(loc[1])  # `status`, not `status.0`, for the first value of a list
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.type, exc.code, exc.message, exc.param),
            status_code=exc.status,
            headers=exc.headers,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(
                error_body("invalid_request_error", "body_invalid", "The body is not valid JSON."),
                status_code=400,
            )
        loc = tuple(first.get("loc", ()))
        param = _param(loc)
        message = str(first.get("msg", "invalid request"))
        if first.get("type") == "string_pattern_mismatch" and param in PATTERN_RULES:
            message = PATTERN_RULES[param]
        code = "parameter_invalid"
        if first.get("type") == "missing":
            code = "parameter_missing"
        elif first.get("type") == "extra_forbidden":
            code = "parameter_unknown"
        if param:
            message = f"{param}: {message}"
        elif loc[:1] == ("body",):
            message = f"body: {message}"
        return JSONResponse(
            error_body("invalid_request_error", code, message, param), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_, code = _STATUS_CODES.get(exc.status_code, ("api_error", "error"))
        message = exc.detail if isinstance(exc.detail, str) else code
        if (exc.status_code, message) == (400, _BODY_UNREADABLE):
            # JSON Python will not read, e.g. an integer of more than 4,300 digits.
            code, message = "body_invalid", "The body could not be read as JSON."
        return JSONResponse(
            error_body(type_, code, message),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(psycopg.errors.IdleInTransactionSessionTimeout)
    async def _database_unavailable(_: Request, exc: psycopg.Error) -> JSONResponse:
        # The server is down or restarting, no connection came free in time (PoolTimeout), or
        # a transient refusal (lock or statement timeout, deadlock, serialization failure, a
        # transaction ended by the server for idling: api.app.API_SESSION, a statement
        # prepared before a migration changed its columns: tasks.db.stale_plan).
        # The transaction was rolled back, or its commit's fate is unknown: the same request
        # with the same Idempotency-Key is the safe way on.
        log.warning("database unavailable: %s: %s", type(exc).__name__, exc)
        return JSONResponse(
            error_body(
                "api_error",
                "database_unavailable",
                "The database is not available at the moment; try again after Retry-After "
                "seconds, with the same Idempotency-Key.",
            ),
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    @app.exception_handler(psycopg.errors.FeatureNotSupported)
    async def _not_supported(request: Request, exc: psycopg.Error) -> JSONResponse:
        if stale_plan(exc):
            return await _database_unavailable(request, exc)
        return await _unexpected(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            error_body("api_error", "internal_error", "An internal error occurred."),
            status_code=500,
        )
