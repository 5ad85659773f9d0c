"""A Python client for agents: `AgentPay` (sync) and `AsyncAgentPay` (async), on httpx.

    async with AsyncAgentPay("http://127.0.0.1:8000", api_key) as client:
        payment = await client.create_payment(
            amount=1999, currency="usd", payment_method="pm_card_visa"
        )
        payment = await client.wait_for_payment(payment.id, timeout=30)
        print(payment.status)

What it does for you:

- Every POST carries an `Idempotency-Key`, one per logical request (yours, or a fresh UUID),
  reused on every retry of that request — so a retry never pays twice.
- Transport errors (connection refused or reset, timeouts, a lost response) and 429/5xx
  answers are retried up to `max_retries` times with exponential backoff and full jitter,
  waiting at least as long as `Retry-After` says.
- Answers are typed: `Payment`, `PaymentList`, `Refund` (pydantic models); errors raise
  `AgentPayError` with the server's `type`, `code`, `message` and `param`.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from api.models import (
    EventList,
    Payment,
    PaymentEvent,
    PaymentList,
    Refund,
    RefundList,
    wait_is_over,
)

__all__ = [
    "AgentPay",
    "AgentPayConnectionError",
    "AgentPayError",
    "AsyncAgentPay",
    "Payment",
    "PaymentEvent",
    "PaymentList",
    "Refund",
]

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# The server caps one long-poll at 60 s; longer waits are several long-polls.
MAX_POLL_SECONDS = 60.0

Model = TypeVar("Model", bound=BaseModel)


class AgentPayError(Exception):
    """The server refused the request (or kept failing): its error, as it sent it."""

    def __init__(
        self,
        status: int,
        type_: str,
        code: str,
        message: str,
        param: str | None = None,
        *,
        response: httpx.Response | None = None,
        idempotency_key: str | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.type = type_
        self.code = code
        self.message = message
        self.param = param
        self.response = response
        # The Idempotency-Key the request was sent with (the client makes one for a POST
        # without): send the same request again with it, never a new one, when the outcome
        # is unknown (a 5xx, or no answer at all).
        self.idempotency_key = idempotency_key or _sent_key(response)

    @classmethod
    def from_response(cls, response: httpx.Response) -> AgentPayError:
        try:
            error = response.json()["error"]
            return cls(
                response.status_code,
                str(error.get("type", "api_error")),
                str(error.get("code", "error")),
                str(error.get("message", "")),
                error.get("param"),
                response=response,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls(
                response.status_code,
                "api_error",
                "unexpected_response",
                response.text[:200],
                response=response,
            )


class AgentPayConnectionError(AgentPayError):
    """The server could not be reached (or answered nothing) after every retry. The request
    may have been done: send it again with `idempotency_key`."""

    def __init__(self, error: httpx.TransportError, idempotency_key: str | None = None) -> None:
        super().__init__(
            0,
            "api_connection_error",
            type(error).__name__,
            str(error) or "",
            idempotency_key=idempotency_key,
        )


def _sent_key(response: httpx.Response | None) -> str | None:
    try:
        return None if response is None else response.request.headers.get("Idempotency-Key")
    except RuntimeError:  # a response built without its request
        return None


def _wait_targets(status: str | Iterable[str] | None) -> list[str] | None:
    """The states a wait stops at (or past); None: the server's default (a settled state).
    One state may be given as a string; an empty collection would never be met, so it is
    refused."""
    if status is None:
        return None
    wanted = sorted({status} if isinstance(status, str) else set(status))
    if not wanted:
        raise ValueError("status: name at least one state, or leave it out for the default")
    return wanted


class _Cursor:
    """Where `iter_payments` is: older and older pages from `starting_after` (or the
    newest), or newer and newer ones from `ending_before`. Takes both out of `filters`, and
    `limit`: `list_payments`' page size, the page size here too."""

    def __init__(self, page_size: int, filters: dict[str, Any]) -> None:
        self.page_size: int = filters.pop("limit", page_size)
        self.after: str | None = filters.pop("starting_after", None)
        self.before: str | None = filters.pop("ending_before", None)
        if self.after is not None and self.before is not None:
            raise ValueError("iter_payments: give starting_after or ending_before, not both")

    def turn(self, page: PaymentList) -> bool:
        """Move past `page`; False when it was the last."""
        if not page.has_more or not page.data:
            return False
        if self.before is not None:
            self.before = page.data[0].id  # the newest of the page: newer ones follow
        else:
            self.after = page.data[-1].id
        return True


class _Poll:
    """The long-polls of one `wait_for_payment`: each asks the server to wait at most
    what is left of the caller's `timeout` (also when retried), and retries stop at it."""

    def __init__(self, timeout: float, wanted: list[str] | None, request_timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.wanted = wanted
        self.request_timeout = request_timeout

    def wait(self) -> float:
        return min(max(0.0, self.deadline - time.monotonic()), MAX_POLL_SECONDS)

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"timeout": round(self.wait(), 3)}
        if self.wanted is not None:
            params["status"] = self.wanted
        return params

    def attempt_timeout(self) -> float:
        return self.wait() + self.request_timeout

    def done_or_pause(self, payment: Payment, started: float) -> float | None:
        """None when the wait is over (the payment is there, or time is up); else how long
        to pause before the next poll: a moment when the server answered well before the
        time asked for (an API process that is stopping answers at once), none otherwise."""
        now = time.monotonic()
        if (
            wait_is_over(payment.status, payment.pending_action, self.wanted)
            or now >= self.deadline
        ):
            return None
        asked = min(self.deadline - started, MAX_POLL_SECONDS)
        if now - started >= asked / 2:
            return 0.0
        return min(self.deadline - now, random.uniform(0.5, 1.0))


class _Base:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    def _headers(self, idempotency_key: str | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.api_key}", "Accept": "application/json"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        return headers

    @staticmethod
    def _key_for(method: str, idempotency_key: str | None) -> str | None:
        """Every POST carries a key (one per logical request, the same on each retry), however
        the method is spelled: a retried POST without one could act twice."""
        if method.upper() == "POST" and idempotency_key is None:
            return _new_key()
        return idempotency_key

    def _pause(
        self, attempt: int, response: httpx.Response | None, deadline: float | None
    ) -> float | None:
        """Seconds to wait before retry number `attempt`, or None for no retry: retries are
        used up, or (with a deadline) the wait would end past it."""
        if attempt >= self.max_retries:
            return None
        pause = self.delay(attempt, response)
        if deadline is not None and time.monotonic() + pause >= deadline:
            return None
        return pause

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds before retry number `attempt` (0-based): full-jitter exponential backoff,
        but never less than the server's `Retry-After`."""
        wait = random.uniform(0, min(self.max_backoff, self.backoff * 2**attempt))
        if response is not None:
            wait = max(wait, retry_after(response))
        return wait

    @staticmethod
    def _retryable(response: httpx.Response) -> bool:
        if response.status_code == 409:
            # The same key was in progress elsewhere: the same request again is safe.
            return response.headers.get("Retry-After") is not None
        return response.status_code in RETRY_STATUSES or response.status_code >= 500

    @staticmethod
    def _parse(response: httpx.Response, model: type[Model]) -> Model:
        if response.is_success:
            return model.model_validate_json(response.content)
        raise AgentPayError.from_response(response)


def retry_after(response: httpx.Response) -> float:
    """The `Retry-After` header in seconds (a number or an HTTP date), else 0."""
    value = response.headers.get("Retry-After")
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - time.time())


def _payment_body(
    *,
    amount: int | None,
    currency: str,
    payment_method: str,
    customer: str | None,
    line_items: Iterable[dict[str, Any]] | None,
    capture_method: str,
    description: str | None,
    metadata: dict[str, str] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "currency": currency,
        "payment_method": payment_method,
        "capture_method": capture_method,
    }
    if amount is not None:
        body["amount"] = amount
    if customer is not None:
        body["customer"] = customer
    if line_items is not None:
        body["line_items"] = list(line_items)
    if description is not None:
        body["description"] = description
    if metadata:
        body["metadata"] = metadata
    return body


def _instant(when: datetime | None) -> str | None:
    """A moment as the API takes it: with its offset. A naive datetime is local time, as
    Python's own `datetime.timestamp()` takes it (the API would read one sent without an
    offset as UTC)."""
    return None if when is None else when.astimezone(UTC).isoformat()


def _list_params(
    limit: int,
    starting_after: str | None,
    ending_before: str | None,
    status: str | Sequence[str] | None,
    created_gte: datetime | None,
    created_lte: datetime | None,
) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    for name, value in (
        ("starting_after", starting_after),
        ("ending_before", ending_before),
        # Several states: `status=a&status=b` (httpx sends a list so), payments in any of them.
        ("status", status if status is None or isinstance(status, str) else _states(status)),
        ("created[gte]", _instant(created_gte)),
        ("created[lte]", _instant(created_lte)),
    ):
        if value is not None:
            params[name] = value
    return params


def _states(status: Sequence[str]) -> list[str]:
    if not status:
        raise ValueError("status: name at least one state, or leave it out")
    return list(status)


def _segment(value: str) -> str:
    """An id as one path segment: an id like "../agents" or "x?y" cannot reach another route."""
    return quote(value, safe="")


def _new_key() -> str:
    return f"agentpay-py-{uuid.uuid4()}"


class AsyncAgentPay(_Base):
    """The async client. Use `async with`, or call `aclose()` when done."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
        )
        self._sleep = sleep
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, transport=transport)

    async def __aenter__(self) -> AsyncAgentPay:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpx's timeout for each attempt
    ) -> httpx.Response:
        """One logical request, retried on transport errors, 429 and 5xx (POSTs always with
        the same Idempotency-Key). Returns the last response; raises AgentPayConnectionError
        if no response ever came."""
        return await self._send(
            method,
            path,
            json=json,
            attempt_params=lambda: params,
            idempotency_key=idempotency_key,
            attempt_timeout=lambda: timeout if timeout is not None else self.timeout,
        )

    async def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any,
        attempt_params: Callable[[], dict[str, Any] | None],
        idempotency_key: str | None,
        attempt_timeout: Callable[[], float],
        deadline: float | None = None,
    ) -> httpx.Response:
        """`request`, with the query and the timeout taken afresh for each attempt, and no
        retry (nor wait before one) past `deadline` (monotonic seconds) when given."""
        idempotency_key = self._key_for(method, idempotency_key)
        headers = self._headers(idempotency_key)
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    method,
                    path,
                    json=json,
                    params=attempt_params(),
                    headers=headers,
                    timeout=attempt_timeout(),
                )
            except httpx.TransportError as error:
                pause = self._pause(attempt, None, deadline)
                if pause is None:
                    raise AgentPayConnectionError(error, idempotency_key) from error
                await self._sleep(pause)
            else:
                pause = self._pause(attempt, response, deadline)
                if not self._retryable(response) or pause is None:
                    return response
                await self._sleep(pause)
            attempt += 1

    async def create_payment(
        self,
        *,
        currency: str,
        payment_method: str,
        amount: int | None = None,
        customer: str | None = None,
        line_items: Iterable[dict[str, Any]] | None = None,
        capture_method: Literal["automatic", "manual"] = "automatic",
        description: str | None = None,
        metadata: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Payment:
        """Ask for a payment (`amount` in minor units, or `line_items`; `customer`: the
        provider's Customer a saved payment method belongs to). Returns it as recorded
        (`received`); the workers take it from there."""
        body = _payment_body(
            amount=amount,
            currency=currency,
            payment_method=payment_method,
            customer=customer,
            line_items=line_items,
            capture_method=capture_method,
            description=description,
            metadata=metadata,
        )
        response = await self.request(
            "POST", "/v1/payments", json=body, idempotency_key=idempotency_key
        )
        return self._parse(response, Payment)

    async def get_payment(self, payment_id: str) -> Payment:
        return self._parse(
            await self.request("GET", f"/v1/payments/{_segment(payment_id)}"), Payment
        )

    async def list_payments(
        self,
        *,
        limit: int = 10,
        starting_after: str | None = None,
        ending_before: str | None = None,
        status: str | Sequence[str] | None = None,
        created_gte: datetime | None = None,
        created_lte: datetime | None = None,
    ) -> PaymentList:
        """One page of your payments, newest first."""
        params = _list_params(
            limit, starting_after, ending_before, status, created_gte, created_lte
        )
        return self._parse(await self.request("GET", "/v1/payments", params=params), PaymentList)

    async def iter_payments(
        self, *, page_size: int = 100, **filters: Any
    ) -> AsyncIterator[Payment]:
        """Every payment matching the filters of `list_payments`, page by page: newest first,
        or, with `ending_before`, every payment newer than that one, the pages going towards
        the newest (each page newest first). `limit` is taken as `page_size`."""
        cursor = _Cursor(page_size, filters)
        while True:
            page = await self.list_payments(
                limit=cursor.page_size,
                starting_after=cursor.after,
                ending_before=cursor.before,
                **filters,
            )
            for payment in page.data:
                yield payment
            if not cursor.turn(page):
                return

    async def wait_for_payment(
        self,
        payment_id: str,
        *,
        timeout: float = 60.0,  # noqa: ASYNC109 - the server waits; this bounds the wait
        status: str | Iterable[str] | None = None,
    ) -> Payment:
        """Wait (long-polling, not hammering) until the payment is in one of `status` or
        past it — in a state it can only reach through it: `status="succeeded"` also ends on
        reconciled, partially_refunded or refunded (`succeeded` lasts moments), while
        `"authorized"` ends on authorized alone (a payment can succeed without it). By
        default: a settled state — final, or succeeded, authorized, requires_action,
        partially_refunded — with no capture, cancel or refund pending. Or until `timeout`
        seconds pass. Returns the payment as it is then: check its `status`."""
        poll = _Poll(timeout, _wait_targets(status), self.timeout)
        while True:
            started = time.monotonic()
            response = await self._send(
                "GET",
                f"/v1/payments/{_segment(payment_id)}/wait",
                json=None,
                attempt_params=poll.params,
                idempotency_key=None,
                attempt_timeout=poll.attempt_timeout,
                deadline=poll.deadline,
            )
            payment = self._parse(response, Payment)
            pause = poll.done_or_pause(payment, started)
            if pause is None:
                return payment
            await self._sleep(pause)

    async def capture(self, payment_id: str, *, idempotency_key: str | None = None) -> Payment:
        """Capture an `authorized` (manual capture) payment."""
        response = await self.request(
            "POST", f"/v1/payments/{_segment(payment_id)}/capture", idempotency_key=idempotency_key
        )
        return self._parse(response, Payment)

    async def cancel(
        self, payment_id: str, *, reason: str | None = None, idempotency_key: str | None = None
    ) -> Payment:
        response = await self.request(
            "POST",
            f"/v1/payments/{_segment(payment_id)}/cancel",
            json={"reason": reason} if reason is not None else None,
            idempotency_key=idempotency_key,
        )
        return self._parse(response, Payment)

    async def refund(
        self,
        payment_id: str,
        *,
        amount: int | None = None,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> Refund:
        """Refund all (no `amount`) or part of a succeeded (or reconciled, or partially
        refunded) payment; it is carried out once the payment is reconciled."""
        body = {k: v for k, v in (("amount", amount), ("reason", reason)) if v is not None}
        response = await self.request(
            "POST",
            f"/v1/payments/{_segment(payment_id)}/refunds",
            json=body or None,
            idempotency_key=idempotency_key,
        )
        return self._parse(response, Refund)

    async def list_refunds(self, payment_id: str) -> list[Refund]:
        """The payment's refunds, oldest first, each with its status (and failure)."""
        response = await self.request("GET", f"/v1/payments/{_segment(payment_id)}/refunds")
        return self._parse(response, RefundList).data

    async def list_events(self, payment_id: str) -> list[PaymentEvent]:
        """The payment's events, oldest first: every transition, and why a capture or
        cancel was refused (`capture_failed`, `cancel_failed`)."""
        response = await self.request("GET", f"/v1/payments/{_segment(payment_id)}/events")
        return self._parse(response, EventList).data


class AgentPay(_Base):
    """The sync client: the same methods as `AsyncAgentPay`, blocking. Use `with`, or call
    `close()` when done."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 30.0,
        max_retries: int = 4,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        super().__init__(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
        )
        self._sleep = sleep
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport)

    def __enter__(self) -> AgentPay:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        """See `AsyncAgentPay.request`."""
        return self._send(
            method,
            path,
            json=json,
            attempt_params=lambda: params,
            idempotency_key=idempotency_key,
            attempt_timeout=lambda: timeout if timeout is not None else self.timeout,
        )

    def _send(
        self,
        method: str,
        path: str,
        *,
        json: Any,
        attempt_params: Callable[[], dict[str, Any] | None],
        idempotency_key: str | None,
        attempt_timeout: Callable[[], float],
        deadline: float | None = None,
    ) -> httpx.Response:
        """See `AsyncAgentPay._send`."""
        idempotency_key = self._key_for(method, idempotency_key)
        headers = self._headers(idempotency_key)
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    method,
                    path,
                    json=json,
                    params=attempt_params(),
                    headers=headers,
                    timeout=attempt_timeout(),
                )
            except httpx.TransportError as error:
                pause = self._pause(attempt, None, deadline)
                if pause is None:
                    raise AgentPayConnectionError(error, idempotency_key) from error
                self._sleep(pause)
            else:
                pause = self._pause(attempt, response, deadline)
                if not self._retryable(response) or pause is None:
                    return response
                self._sleep(pause)
            attempt += 1

    def create_payment(
        self,
        *,
        currency: str,
        payment_method: str,
        amount: int | None = None,
        customer: str | None = None,
        line_items: Iterable[dict[str, Any]] | None = None,
        capture_method: Literal["automatic", "manual"] = "automatic",
        description: str | None = None,
        metadata: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Payment:
        """See `AsyncAgentPay.create_payment`."""
        body = _payment_body(
            amount=amount,
            currency=currency,
            payment_method=payment_method,
            customer=customer,
            line_items=line_items,
            capture_method=capture_method,
            description=description,
            metadata=metadata,
        )
        response = self.request("POST", "/v1/payments", json=body, idempotency_key=idempotency_key)
        return self._parse(response, Payment)

    def get_payment(self, payment_id: str) -> Payment:
        return self._parse(self.request("GET", f"/v1/payments/{_segment(payment_id)}"), Payment)

    def list_payments(
        self,
        *,
        limit: int = 10,
        starting_after: str | None = None,
        ending_before: str | None = None,
        status: str | Sequence[str] | None = None,
        created_gte: datetime | None = None,
        created_lte: datetime | None = None,
    ) -> PaymentList:
        params = _list_params(
            limit, starting_after, ending_before, status, created_gte, created_lte
        )
        return self._parse(self.request("GET", "/v1/payments", params=params), PaymentList)

    def iter_payments(self, *, page_size: int = 100, **filters: Any) -> Iterator[Payment]:
        """See `AsyncAgentPay.iter_payments`."""
        cursor = _Cursor(page_size, filters)
        while True:
            page = self.list_payments(
                limit=cursor.page_size,
                starting_after=cursor.after,
                ending_before=cursor.before,
                **filters,
            )
            yield from page.data
            if not cursor.turn(page):
                return

    def wait_for_payment(
        self, payment_id: str, *, timeout: float = 60.0, status: str | Iterable[str] | None = None
    ) -> Payment:
        """See `AsyncAgentPay.wait_for_payment`."""
        poll = _Poll(timeout, _wait_targets(status), self.timeout)
        while True:
            started = time.monotonic()
            response = self._send(
                "GET",
                f"/v1/payments/{_segment(payment_id)}/wait",
                json=None,
                attempt_params=poll.params,
                idempotency_key=None,
                attempt_timeout=poll.attempt_timeout,
                deadline=poll.deadline,
            )
            payment = self._parse(response, Payment)
            pause = poll.done_or_pause(payment, started)
            if pause is None:
                return payment
            self._sleep(pause)

    def capture(self, payment_id: str, *, idempotency_key: str | None = None) -> Payment:
        response = self.request(
            "POST", f"/v1/payments/{_segment(payment_id)}/capture", idempotency_key=idempotency_key
        )
        return self._parse(response, Payment)

    def cancel(
        self, payment_id: str, *, reason: str | None = None, idempotency_key: str | None = None
    ) -> Payment:
        response = self.request(
            "POST",
            f"/v1/payments/{_segment(payment_id)}/cancel",
            json={"reason": reason} if reason is not None else None,
            idempotency_key=idempotency_key,
        )
        return self._parse(response, Payment)

    def refund(
        self,
        payment_id: str,
        *,
        amount: int | None = None,
        reason: str | None = None,
        idempotency_key: str | None = None,
    ) -> Refund:
        body = {k: v for k, v in (("amount", amount), ("reason", reason)) if v is not None}
        response = self.request(
            "POST",
            f"/v1/payments/{_segment(payment_id)}/refunds",
            json=body or None,
            idempotency_key=idempotency_key,
        )
        return self._parse(response, Refund)

    def list_refunds(self, payment_id: str) -> list[Refund]:
        """See `AsyncAgentPay.list_refunds`."""
        response = self.request("GET", f"/v1/payments/{_segment(payment_id)}/refunds")
        return self._parse(response, RefundList).data

    def list_events(self, payment_id: str) -> list[PaymentEvent]:
        """See `AsyncAgentPay.list_events`."""
        response = self.request("GET", f"/v1/payments/{_segment(payment_id)}/events")
        return self._parse(response, EventList).data
