"""Idempotency-Key on every POST, with Stripe's semantics.

A POST route takes `idem: IdempotencyDep` and does its business write inside
`idem.transaction()`, ending with `return await idem.respond(body, status_code)`:

    async with idem.transaction() as conn:
        payment = await payments.insert(conn, ...)
        await defer(conn, "pricing", payment_id=payment["id"])
        return await idem.respond(Payment.model_validate(payments.public(payment)), 202)

With an `Idempotency-Key` header, the transaction first inserts the key's row
(`idempotency_keys`, unique per agent and key); `respond()` stores the response in that row;
both commit with the business write or not at all, and the database refuses to commit a key
without its response. So:

- the same key with the same request (method, path and JSON body) gets the stored response
  back — status and body, byte for byte, with `Idempotent-Replayed: true`;
- copies arriving together block on the key's row until the first commits, then replay it
  (if the first fails with a 5xx, nothing was stored and the next copy runs instead);
- the same key with another request is refused with 409 `idempotency_key_reused` and
  changes nothing;
- a 4xx the route raises inside the block (e.g. a state conflict) is stored and replayed too
  (the business write is rolled back to a savepoint first); errors found before the route
  runs (authentication, validation, rate limits) and 5xx are never stored;
- keys are scoped per agent and kept `idempotency_retention_hours` (at least 24); `prune()`
  deletes older ones, and an expired key is simply used afresh.

Without the header the block is a plain transaction and `respond()` only renders.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from typing import Annotated, Any

import psycopg
from fastapi import Depends, FastAPI, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import Response
from pydantic import BaseModel

from api.deps import AgentDep, PoolDep
from api.errors import RETRY_AFTER_SECONDS, ApiError, error_body
from api.models import whole_number
from tasks.agents import Agent
from tasks.db import Conn, Pool

log = logging.getLogger("agentpay.api")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
# Printable ASCII, no spaces, like Stripe's (said so in errors.PATTERN_RULES).
KEY_PATTERN = r"^[!-~]{1,255}$"

_CLAIM = """
INSERT INTO idempotency_keys AS k (agent_id, key, request_method, request_path, request_hash)
VALUES (%(agent_id)s, %(key)s, %(method)s, %(path)s, %(hash)s)
ON CONFLICT (agent_id, key) DO UPDATE
    SET request_method = EXCLUDED.request_method,
        request_path = EXCLUDED.request_path,
        request_hash = EXCLUDED.request_hash,
        response_status = NULL,
        response_body = NULL,
        created_at = now()
    -- Only an expired key is taken over; a live one is left alone (and replayed below).
    WHERE k.created_at < now() - make_interval(secs => %(retention)s)
RETURNING 1
"""

_STORED = """
SELECT request_hash, response_status, response_body::text AS body
FROM idempotency_keys WHERE agent_id = %s AND key = %s
"""

_STORE = """
UPDATE idempotency_keys SET response_status = %s, response_body = %s::json
WHERE agent_id = %s AND key = %s
"""

_PRUNE = """
DELETE FROM idempotency_keys
WHERE (agent_id, key) IN (
    SELECT agent_id, key FROM idempotency_keys
    WHERE created_at < now() - make_interval(secs => %s)
    ORDER BY created_at LIMIT %s
)
"""


class Replay(Exception):
    """The stored response of an earlier request with the same key."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(status)
        self.status = status
        self.body = body

    def response(self) -> Response:
        return Response(
            self.body.encode(),
            status_code=self.status,
            media_type="application/json",
            headers={REPLAYED_HEADER: "true"},
        )


def render(body: Any) -> str:
    """The JSON text of a response body, as Starlette's JSONResponse would write it."""
    if isinstance(body, BaseModel):
        body = body.model_dump(mode="json")
    return json.dumps(
        jsonable_encoder(body), ensure_ascii=False, allow_nan=False, separators=(",", ":")
    )


def _json_number(text: str) -> Any:
    """A JSON number with a fraction or exponent: a whole one is the integer validation reads."""
    return whole_number(float(text))


def fingerprint(method: str, path: str, body: bytes) -> bytes:
    """SHA-256 of the request: method, path and the JSON body with its keys sorted and whole
    numbers as integers (so the same parameters in another order, spacing or spelling —
    `2000.0` — are the same request); no body, and `null`, are the empty object, as validation
    reads them."""
    try:
        parsed = json.loads(body, parse_float=_json_number) if body.strip() else {}
        if parsed is None:  # `null` is read as no body (refunds, cancels): the same request
            parsed = {}
        canonical = json.dumps(parsed, sort_keys=True, separators=(",", ":"))
        content = canonical.encode()
    # Not JSON, or nested too deep for the parser: the bytes as they are. (api/limits.py
    # refuses a body too deep, or sent as another type than JSON, before this runs.)
    except (ValueError, RecursionError):
        content = body
    return hashlib.sha256(b"\n".join([method.encode(), path.encode(), content])).digest()


class Idempotency:
    """The idempotent transaction of one POST request (see the module docstring)."""

    def __init__(
        self,
        pool: Pool,
        agent: Agent,
        key: str | None,
        request_hash: bytes,
        method: str,
        path: str,
        retention_seconds: float,
    ) -> None:
        self.pool = pool
        self.agent = agent
        self.key = key
        self.request_hash = request_hash
        self.method = method
        self.path = path
        self.retention_seconds = retention_seconds
        self._conn: Conn | None = None
        self._stored = False

    @asynccontextmanager
    async def transaction(self, *, may_refuse: bool = True) -> AsyncIterator[Conn]:
        """The route's transaction. `may_refuse=False` tells that the route raises no 4xx
        inside the block (its input was validated before), so no savepoint is needed: two
        round trips less on the hottest route. A 4xx raised there anyway is answered but
        not stored (the whole transaction, key included, rolls back)."""
        stored_error: ApiError | None = None
        async with self.pool.connection() as conn:
            async with conn.transaction():
                if self.key is not None:
                    await self._claim(conn)
                self._conn = conn
                try:
                    # A savepoint: a 4xx raised by the route undoes its writes but keeps the
                    # key's row, which then stores the error. Without a key nothing is
                    # stored, so the savepoint (two round trips) is left out.
                    with_savepoint = self.key is not None and may_refuse
                    savepoint = conn.transaction() if with_savepoint else nullcontext()
                    async with savepoint:
                        yield conn
                        if self.key is not None and not self._stored:
                            raise RuntimeError("an idempotent route must end with respond()")
                except ApiError as error:
                    if not with_savepoint or not 400 <= error.status < 500:
                        raise
                    body = error_body(error.type, error.code, error.message, error.param)
                    await self._store(conn, error.status, render(body))
                    stored_error = error
                finally:
                    self._conn = None
        if stored_error is not None:
            raise stored_error

    async def respond(self, body: Any, status_code: int = 200) -> Response:
        """Render the route's response and, with a key, store it in this transaction."""
        text = render(body)
        if self.key is not None:
            if self._conn is None:
                raise RuntimeError("respond() belongs inside idem.transaction()")
            await self._store(self._conn, status_code, text)
        return Response(text.encode(), status_code=status_code, media_type="application/json")

    async def _store(self, conn: Conn, status: int, text: str) -> None:
        await conn.execute(_STORE, (status, text, self.agent.id, self.key))
        self._stored = True

    async def _claim(self, conn: Conn) -> None:
        """Own the key for this transaction, or raise the stored answer (or the conflict)."""
        params = {
            "agent_id": self.agent.id,
            "key": self.key,
            "method": self.method,
            "path": self.path,
            "hash": self.request_hash,
            "retention": self.retention_seconds,
        }
        # A concurrent first request holds the row: this waits until it commits (or rolls
        # back, and then the row is ours) — at most the session's lock_timeout, then busy.
        for _ in range(3):
            try:
                cur = await conn.execute(_CLAIM, params)
            except psycopg.errors.LockNotAvailable:
                break
            if await cur.fetchone() is not None:
                return
            cur = await conn.execute(_STORED, (self.agent.id, self.key))
            row = await cur.fetchone()
            if row is None:  # pruned in between: claim again
                continue
            if bytes(row["request_hash"]) != self.request_hash:
                raise ApiError(
                    409,
                    "idempotency_key_reused",
                    "This Idempotency-Key was already used with other parameters (or on "
                    "another route). Use a new key for a new request.",
                    type_="idempotency_error",
                    param=HEADER,
                )
            raise Replay(row["response_status"], row["body"])
        raise ApiError(
            409,
            "idempotency_key_busy",
            "Another request with this Idempotency-Key was in progress; send this one again, "
            "with the same key, after Retry-After seconds.",
            type_="idempotency_error",
            param=HEADER,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )


async def idempotency(
    request: Request,
    agent: AgentDep,
    pool: PoolDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=HEADER,
            pattern=KEY_PATTERN,
            description="Makes the request safe to retry: the same key and the same body "
            "get the stored response; the same key with another body is refused (409). "
            "Printable ASCII, no spaces, at most 255 characters; keys are per agent and kept 24 "
            "hours.",
        ),
    ] = None,
) -> Idempotency:
    settings = request.app.state.settings
    return Idempotency(
        pool,
        agent,
        idempotency_key,
        fingerprint(request.method, request.url.path, await request.body()),
        request.method,
        request.url.path,
        settings.idempotency_retention_hours * 3600,
    )


IdempotencyDep = Annotated[Idempotency, Depends(idempotency)]


async def prune(conn: Conn, retention_seconds: float, batch: int = 5000) -> int:
    """Delete keys older than the retention, in batches; returns how many went."""
    total = 0
    while True:
        cur = await conn.execute(_PRUNE, (retention_seconds, batch))
        total += cur.rowcount
        if cur.rowcount < batch:
            return total


def install(app: FastAPI) -> None:
    @app.exception_handler(Replay)
    async def _replay(_: Request, exc: Replay) -> Response:
        return exc.response()
