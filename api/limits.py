"""Request bodies are checked before anything parses them.

`BodyLimits` is plain ASGI middleware in front of the whole app. It refuses a path or query
string holding a NUL character (Postgres text cannot), and a body whose
`Content-Length` is above the limit without reading it, reads any other body (announced or
chunked) only up to the limit, and then refuses a body sent with a Content-Type that is not
JSON (415; but for provider webhooks, whose receiver reads the raw bytes whatever their type),
and for JSON (or untyped: the app reads those as JSON, `strict_content_type=False` in
api/app.py) bodies, bytes that are not UTF-8 and (but for provider webhooks, whose signature is
checked first) JSON nested deeper than `max_depth` — all with the one error shape, before
FastAPI or the webhook receiver sees a byte. The buffered body is then replayed to the app.
"""

from __future__ import annotations

import re
from email.message import Message

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from api.errors import error_body

WEBHOOK_PREFIX = "/v1/webhooks/"

# A JSON string literal (with escapes); brackets inside strings do not nest anything. An
# unterminated one runs to the end of the text: required, the closing quote would make every
# later quote start a scan to the end again (quadratic: a 1 MiB body would hold the event loop
# for minutes).
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"?', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str, stop_above: int | None = None) -> int:
    """How deeply arrays and objects nest in `text` (JSON, not necessarily valid), or, with
    `stop_above`, the first depth above it (the scan stops there). It also stops where a
    closing bracket has nothing to close: a parser stops at that syntax error too, so nothing
    after it can nest it deeper."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_above is not None and deepest > stop_above:
                    break
        else:
            depth -= 1
            if depth < 0:
                break
    return deepest


def is_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this type as JSON: `application/json`, `…+json`, or
    no type at all (the app is created with `strict_content_type=False`)."""
    if not content_type:
        return True
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


class BodyLimits:
    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, webhook_max_body_bytes: int, max_depth: int
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.webhook_max_body_bytes = webhook_max_body_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        webhook = path.startswith(WEBHOOK_PREFIX)
        limit = self.webhook_max_body_bytes if webhook else self.max_body_bytes
        # Postgres cannot store or compare text with NUL in it: an id or a parameter holding
        # one could only fail deeper down, as a 500.
        if "\x00" in path or b"%00" in scope.get("query_string", b""):
            await _refuse(
                scope,
                receive,
                send,
                400,
                "parameter_invalid",
                "The path and query parameters must not contain NUL characters.",
            )
            return
        headers = Headers(scope=scope)
        announced = headers.get("content-length")
        if announced is not None:
            if not announced.strip().isdigit():
                await _refuse(
                    scope,
                    receive,
                    send,
                    400,
                    "content_length_invalid",
                    "The Content-Length header is not a number.",
                )
                return
            if int(announced) > limit:
                await _too_large(scope, receive, send, limit)
                return

        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _too_large(scope, receive, send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)

        # FastAPI would hand a body of another type (a form, text/plain) to validation as
        # bytes, refused as "Input should be a valid dictionary": say what is wrong instead.
        # The webhook receiver reads the raw bytes, whatever they are sent as.
        json_body = is_json(headers.get("content-type"))
        if body and not json_body and not webhook:
            await _refuse(
                scope,
                receive,
                send,
                415,
                "content_type_invalid",
                "Send the body as JSON, with the header Content-Type: application/json.",
                param="Content-Type",
            )
            return

        if body and json_body:
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            # NUL is never valid in JSON text; it also betrays UTF-16/32, which json.loads
            # would otherwise accept.
            if text is None or "\x00" in text:
                await _refuse(
                    scope,
                    receive,
                    send,
                    400,
                    "body_not_utf8",
                    "The body must be JSON encoded as UTF-8.",
                )
                return
            # Not for provider webhooks (bodies up to 1 MiB): their receiver checks the
            # signature before it parses anything, so an unsigned body costs one HMAC and
            # never this scan.
            if not webhook and json_depth(text, self.max_depth) > self.max_depth:
                await _refuse(
                    scope,
                    receive,
                    send,
                    400,
                    "body_too_deep",
                    f"The JSON body nests deeper than {self.max_depth} levels.",
                )
                return

        replayed = False

        async def replay() -> AsgiMessage:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    await _refuse(
        scope, receive, send, 413, "body_too_large", f"The body is larger than {limit} bytes."
    )


async def _refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    code: str,
    message: str,
    param: str | None = None,
) -> None:
    response = JSONResponse(
        error_body("invalid_request_error", code, message, param), status_code=status
    )
    await response(scope, receive, send)
