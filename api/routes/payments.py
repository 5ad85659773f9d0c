"""Payments: create (record + enqueue in one transaction), read, list, wait, list events."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BeforeValidator, WithJsonSchema

from api.deps import AgentDep, PoolDep
from api.errors import ApiError, not_found, responses
from api.idempotency import IdempotencyDep
from api.models import (
    EventList,
    Payment,
    PaymentCreate,
    PaymentList,
    PaymentStatus,
    wait_is_over,
)
from api.waiters import StatusHub
from tasks import customers, payments, pricing
from tasks.agents import Agent
from tasks.app import defer
from tasks.db import Conn
from tasks.settings import Settings

router = APIRouter(prefix="/v1/payments", tags=["payments"])

# Ids are ours (`pay_` + hex); anything else cannot name a payment.
_ID = re.compile(r"^[A-Za-z0-9_]{1,64}$")
MAX_WAIT_SECONDS = 60


def _scope(agent: Agent) -> str | None:
    """Agents see their own payments; operators see all."""
    return None if agent.is_operator else agent.id


async def visible(
    conn: Conn, payment_id: str, agent: Agent, *, for_update: bool = False
) -> payments.Payment | None:
    """The payment if the agent may see it (its own; operators: any), locked if asked."""
    if not _ID.match(payment_id):
        return None
    if for_update:
        return await payments.lock(conn, payment_id, agent_id=_scope(agent))
    return await payments.get(conn, payment_id, agent_id=_scope(agent))


def _payment(row: payments.Payment) -> Payment:
    return Payment.model_validate(payments.public(row))


@router.post(
    "",
    status_code=202,
    response_model=Payment,
    responses=responses(
        400,
        401,
        403,
        409,
        413,
        429,
        500,
        described={
            403: "The `customer` is not bound to this agent (an operator binds it): "
            "`customer_not_allowed`"
        },
    ),
)
async def create_payment(
    body: PaymentCreate, agent: AgentDep, idem: IdempotencyDep, request: Request
) -> Response:
    """Record a payment and enqueue its pricing, atomically. The pipeline runs from there.

    Send an `Idempotency-Key` to make retries safe: a retry gets the first response back.
    A `customer` belongs to the one agent an operator bound it to; naming one not bound to
    you is a 403 `customer_not_allowed` (not stored under the key: once an operator binds it
    to you, the same request goes through)."""
    _refuse_below_minimum(body, request.app.state.settings)
    # The refusal below is no stored answer: the transaction, key included, rolls back.
    async with idem.transaction(may_refuse=False) as conn:
        if body.customer is not None and not agent.is_operator:
            binding = request.app.state.settings.customer_binding
            if not await customers.may_use(conn, body.customer, agent.id, binding):
                raise ApiError(
                    403,
                    "customer_not_allowed",
                    f"Customer {body.customer} is bound to another agent"
                    if binding == "first_use"
                    else f"Customer {body.customer} is not bound to this agent",
                    type_="permission_error",
                    param="customer",
                )
        payment = await payments.insert(
            conn,
            agent_id=agent.id,
            currency=body.currency,
            payment_method=body.payment_method,
            customer=body.customer,
            capture_method=body.capture_method,
            amount=body.amount,
            line_items=(
                [i.model_dump(exclude_none=True) for i in body.line_items]
                if body.line_items
                else None
            ),
            description=body.description,
            metadata=body.metadata,
        )
        await defer(conn, "pricing", payment_id=payment["id"])
        return await idem.respond(_payment(payment), 202)


def _refuse_below_minimum(body: PaymentCreate, settings: Settings) -> None:
    """A 400 for a payment whose total — known here unless a line names a catalog SKU — is
    below the provider's smallest charge (pricing would reject it; the provider would fail
    it as `amount_too_small`). Tax and fee count: they may lift a small amount over it."""
    minimum = settings.min_charge_amount.get(body.currency)
    lines = [i.model_dump(exclude_none=True) for i in body.line_items or ()]
    if minimum is None or any("sku" in line for line in lines):
        return
    subtotal = body.amount or sum(line["unit_amount"] * line["quantity"] for line in lines)
    if subtotal >= minimum:
        return
    try:
        pricing.breakdown(lines, body.currency, settings, requested=body.amount)
    except pricing.PricingError as error:
        param = "line_items" if lines else "amount"
        raise ApiError(400, "parameter_invalid", f"{param}: {error.message}", param=param) from None


def _utc(value: datetime | None) -> datetime | None:
    """Timestamps without a zone are UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


_UNIX_MAX = 253_402_300_799  # 9999-12-31T23:59:59Z


# Any other number (`1.5`, `+5`, `1e9`): pydantic would read some as seconds, some not at all.
# A date (`2024-02-28`) is no number: pydantic reads it as midnight (UTC, by `_utc`).
_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def _timestamp(value: Any) -> Any:
    """Whole Unix seconds, or else an ISO 8601 timestamp or date (left to pydantic)."""
    if isinstance(value, str) and re.fullmatch(r"-?[0-9]+", value.strip()):
        seconds = int(value)
        if not 0 <= seconds <= _UNIX_MAX:
            raise ValueError(f"Unix seconds must be between 0 and {_UNIX_MAX}")
        return datetime.fromtimestamp(seconds, UTC)
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        raise ValueError("give an ISO 8601 timestamp or date, or whole Unix seconds")
    return value


Timestamp = Annotated[
    datetime,
    BeforeValidator(_timestamp),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "string", "format": "date"},
                {"type": "integer", "minimum": 0, "maximum": _UNIX_MAX},
            ],
            "description": "An ISO 8601 timestamp (UTC when it has no zone), an ISO 8601 date "
            "(its midnight UTC) or whole Unix seconds",
        }
    ),
]


@router.get("", response_model=PaymentList, responses=responses(400, 401, 404, 429, 500))
async def list_payments(
    agent: AgentDep,
    pool: PoolDep,
    limit: Annotated[int, Query(ge=1, le=100, description="Page size")] = 10,
    starting_after: Annotated[
        str | None,
        Query(max_length=64, description="A payment id: the page starts after it (older)"),
    ] = None,
    ending_before: Annotated[
        str | None,
        Query(max_length=64, description="A payment id: the page ends before it (newer)"),
    ] = None,
    status: Annotated[
        list[PaymentStatus] | None,
        Query(description="Only in this state (repeat it for any of several)"),
    ] = None,
    created_gte: Annotated[Timestamp | None, Query(alias="created[gte]")] = None,
    created_gt: Annotated[Timestamp | None, Query(alias="created[gt]")] = None,
    created_lte: Annotated[Timestamp | None, Query(alias="created[lte]")] = None,
    created_lt: Annotated[Timestamp | None, Query(alias="created[lt]")] = None,
) -> dict[str, Any]:
    """The caller's payments (an operator's: everyone's), newest first, a page at a time.

    Page on with `starting_after` = the last id of a page while `has_more` is true; page back
    with `ending_before` = the first id of a page (a cursor that names no payment of yours is a
    404); with both, the page walks down from `starting_after` and stops before
    `ending_before`. `status` may be repeated (`status=failed&status=canceled`: either).
    `created` bounds take ISO 8601 timestamps (UTC when no zone is given), ISO 8601
    dates (`2024-02-28`: its midnight UTC) or whole Unix seconds."""
    created = {
        "gte": _utc(created_gte),
        "gt": _utc(created_gt),
        "lte": _utc(created_lte),
        "lt": _utc(created_lt),
    }
    async with pool.connection() as conn:
        cursors: dict[str, payments.Payment | None] = {}
        for name, cursor in (("starting_after", starting_after), ("ending_before", ending_before)):
            if cursor is None:
                continue
            found = await visible(conn, cursor, agent)
            if found is None:
                raise ApiError(404, "resource_missing", f"No such payment: {name}", param=name)
            cursors[name] = found
        rows, has_more = await payments.page(
            conn,
            agent_id=_scope(agent),
            limit=limit,
            status=status,
            created=created,
            starting_after=cursors.get("starting_after"),
            ending_before=cursors.get("ending_before"),
        )
    return {
        "object": "list",
        "data": [payments.public(row) for row in rows],
        "has_more": has_more,
        "url": "/v1/payments",
    }


@router.get("/{payment_id}", response_model=Payment, responses=responses(400, 401, 404, 429, 500))
async def get_payment(payment_id: str, agent: AgentDep, pool: PoolDep) -> dict[str, Any]:
    """One payment, as it is now."""
    async with pool.connection() as conn:
        payment = await visible(conn, payment_id, agent)
    if payment is None:
        raise not_found()
    return payments.public(payment)


def hub(app: FastAPI, conninfo: str) -> StatusHub:
    """This process's status listener (one per app), created on first use."""
    found: StatusHub | None = getattr(app.state, "status_hub", None)
    if found is None:
        found = app.state.status_hub = StatusHub(conninfo)
        found.stopping = getattr(app.state, "stopping", False)
    return found


@router.get(
    "/{payment_id}/wait",
    response_model=Payment,
    responses=responses(400, 401, 404, 429, 500),
)
async def wait_for_payment(
    payment_id: str,
    request: Request,
    agent: AgentDep,
    pool: PoolDep,
    wait_seconds: Annotated[
        float,
        Query(alias="timeout", ge=0, le=MAX_WAIT_SECONDS, description="Seconds to wait at most"),
    ] = 30,
    status: Annotated[
        list[PaymentStatus] | None,
        Query(
            description="Return as soon as the payment is in one of these states or past "
            "one: in a state it can only reach through it (`succeeded` also ends on "
            "reconciled, partially_refunded and refunded; `authorized` only on authorized, "
            "since a payment can succeed without it). Repeat the parameter for several. "
            "Default: final, succeeded, authorized, requires_action or partially_refunded, "
            "with no capture, cancel or refund pending."
        ),
    ] = None,
) -> dict[str, Any]:
    """Long-poll: answer once the payment is in one of the `status` states (or past it: in a
    state it can only reach through it), or when `timeout` seconds have passed — with the
    payment as it is then, either way (check its `status`).
    Without `status`, once it is settled and nothing asked for is pending (`pending_action`
    null): after a capture, cancel or refund request, this is how it ended.

    The wait is woken by Postgres LISTEN/NOTIFY, not by polling; it holds no database
    connection while it waits. An API process that is stopping answers at once. An agent
    holds at most `AGENTPAY_LONG_POLL_MAX_PER_AGENT` waits open in one API process (200):
    one more is a 429 `too_many_waits`."""
    settings = request.app.state.settings
    loop = asyncio.get_running_loop()
    deadline = loop.time() + min(wait_seconds, settings.long_poll_max_seconds)
    conninfo = pool.conninfo if isinstance(pool.conninfo, str) else None
    status_hub = hub(request.app, conninfo or settings.resolved_database_url())
    most = settings.long_poll_max_per_agent
    if status_hub.waits_of(agent.id) >= most:
        raise ApiError(
            429,
            "too_many_waits",
            f"This agent already waits on {most} payments here; let one end, or list them "
            "(GET /v1/payments) instead.",
            type_="rate_limit_error",
            headers={"Retry-After": "1"},
        )
    with status_hub.watch(payment_id, owner=agent.id) as changed:
        while True:
            # Cleared before reading: a change from here on sets it again.
            changed.clear()
            async with pool.connection() as conn:
                payment = await visible(conn, payment_id, agent)
            if payment is None:
                raise not_found()
            remaining = deadline - loop.time()
            over = wait_is_over(payment["status"], payments.pending_action(payment), status)
            if over or remaining <= 0 or status_hub.stopping:
                return payments.public(payment)
            try:
                async with asyncio.timeout(min(remaining, settings.long_poll_recheck_seconds)):
                    await changed.wait()
            except TimeoutError:
                pass


@router.get(
    "/{payment_id}/events",
    response_model=EventList,
    responses=responses(400, 401, 404, 429, 500),
)
async def payment_events(payment_id: str, agent: AgentDep, pool: PoolDep) -> dict[str, Any]:
    """Every transition of the payment, oldest first, and what else happened to it. A
    `job_failed` event says which step failed and the error's type; its message (which may
    quote the database or the provider) is for operators, as a 500's is."""
    async with pool.connection() as conn:
        payment = await visible(conn, payment_id, agent)
        if payment is None:
            raise not_found()
        events = await payments.events(conn, payment_id)
    if not agent.is_operator:
        for event in events:
            if event["type"] == "job_failed":
                event["data"] = {k: v for k, v in event["data"].items() if k != "error"}
    return {"object": "list", "data": events}
