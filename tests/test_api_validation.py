"""Bad input gets a clear 4xx in the one error shape and leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest

from api.limits import json_depth
from tasks.db import Pool
from tests.conftest import auth

GOOD = {"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa"}
SQL = "usd'; DROP TABLE payment_jobs; --"

# (what, body) — each must be refused with a 400.
BAD_BODIES: list[tuple[str, Any]] = [
    ("negative amount", {**GOOD, "amount": -100}),
    ("zero amount", {**GOOD, "amount": 0}),
    ("fractional amount", {**GOOD, "amount": 19.99}),
    ("half a minor unit", {**GOOD, "amount": 1999.5}),
    ("exponent notation beyond the limit", {**GOOD, "amount": 1e20}),
    ("huge amount", {**GOOD, "amount": 100_000_000}),
    ("astronomical amount", {**GOOD, "amount": 10**40}),
    ("amount as string", {**GOOD, "amount": "2000"}),
    ("amount as boolean", {**GOOD, "amount": True}),
    ("amount null", {**GOOD, "amount": None}),
    ("three-decimal amount not ending in 0", {**GOOD, "currency": "kwd", "amount": 1005}),
    ("isk amount with a fraction of a króna", {**GOOD, "currency": "isk", "amount": 150}),
    ("currency with a space", {**GOOD, "currency": "USD "}),
    ("currency too long", {**GOOD, "currency": "usdx"}),
    ("currency upper case", {**GOOD, "currency": "USD"}),
    ("unknown currency", {**GOOD, "currency": "xyz"}),
    ("currency not a string", {**GOOD, "currency": 840}),
    ("SQL in the currency", {**GOOD, "currency": SQL}),
    ("SQL in the payment method", {**GOOD, "payment_method": "pm_card_visa' OR '1'='1"}),
    ("no amount or line items", {"currency": "usd", "payment_method": "pm_card_visa"}),
    ("amount and line items", {**GOOD, "line_items": [{"description": "x", "unit_amount": 1}]}),
    ("empty line items", {"currency": "usd", "payment_method": "pm_card_visa", "line_items": []}),
    (
        "too many line items",
        {**GOOD, "amount": None, "line_items": [{"description": "x", "unit_amount": 1}] * 101},
    ),
    (
        "line items total too large",
        {
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "line_items": [{"description": "x", "unit_amount": 99_999_999, "quantity": 2}],
        },
    ),
    ("unknown field", {**GOOD, "amount_override": 1}),
    ("unknown capture method", {**GOOD, "capture_method": "later"}),
    ("51 metadata keys", {**GOOD, "metadata": {f"k{i}": "v" for i in range(51)}}),
    ("metadata key of 41 characters", {**GOOD, "metadata": {"k" * 41: "v"}}),
    ("metadata value of 501 characters", {**GOOD, "metadata": {"k": "v" * 501}}),
    ("metadata value not a string", {**GOOD, "metadata": {"k": {"nested": "v"}}}),
    ("NUL in the description", {**GOOD, "description": "a\u0000b"}),
    ("NUL in metadata", {**GOOD, "metadata": {"k\u0000": "v"}}),
    ("lone surrogate in metadata", {**GOOD, "metadata": {"k": "\ud800"}}),
    ("lone surrogate in a metadata key", {**GOOD, "metadata": {"\udfff": "v"}}),
    (
        "custom lines too large beside a catalog line",
        {
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "line_items": [
                {"sku": "widget"},
                {"description": "x", "unit_amount": 99_999_999, "quantity": 10},
            ],
        },
    ),
    ("not an object", [GOOD]),
    ("below the provider's smallest charge", {**GOOD, "amount": 49}),
    ("below the smallest charge in yen", {**GOOD, "currency": "jpy", "amount": 49}),
    (
        "custom lines below the smallest charge",
        {
            "currency": "usd",
            "payment_method": "pm_card_visa",
            "line_items": [{"description": "x", "unit_amount": 20, "quantity": 2}],
        },
    ),
]


async def snapshot(pool: Pool) -> tuple[int, ...]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            """SELECT (SELECT count(*) FROM payment_jobs) AS p,
                      (SELECT count(*) FROM payment_events) AS e,
                      (SELECT count(*) FROM procrastinate_jobs) AS j,
                      (SELECT count(*) FROM procrastinate_events) AS je,
                      (SELECT count(*) FROM idempotency_keys) AS k"""
        )
        row = await cur.fetchone()
    assert row is not None
    return tuple(row.values())


def assert_error_shape(response: httpx.Response, status: int, secrets: tuple[str, ...]) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"type", "code", "message", "param"}
    assert body["error"]["type"] and body["error"]["code"] and body["error"]["message"]
    text = response.text
    for leak in ("Traceback", "psycopg", "SELECT ", "INSERT ", 'File "', *secrets):
        assert leak not in text


async def test_bad_bodies_are_refused_and_leave_nothing_behind(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    before = await snapshot(pool)
    for index, (what, body) in enumerate(BAD_BODIES):
        response = await api.post(
            "/v1/payments",
            content=json.dumps(body).encode(),
            headers={
                **auth(agent_key),
                "Content-Type": "application/json",
                "Idempotency-Key": f"bad-{index}",
            },
        )
        assert response.status_code == 400, (what, response.text)
        assert_error_shape(response, 400, (agent_key,))
    assert await snapshot(pool) == before


async def test_a_total_below_the_providers_smallest_charge_is_refused_naming_it(
    api: httpx.AsyncClient, agent_key: str
) -> None:
    """Stripe fails a charge under its minimum (`amount_too_small`, $0.50 in usd): such a
    payment was taken (202), its budget held, and failed at the charge. Where the total is
    known at the POST it is a 400 now; the minimum itself, and a currency without one, go
    through."""
    answers = {}
    for key, body in {
        "small": {**GOOD, "amount": 49},
        "lines": {
            **GOOD,
            "amount": None,
            "line_items": [{"description": "x", "unit_amount": 49}],
        },
        "minimum": {**GOOD, "amount": 50},
        "yen minimum": {**GOOD, "currency": "jpy", "amount": 50},
        "no minimum known": {**GOOD, "currency": "kwd", "amount": 10},
    }.items():
        body = {k: v for k, v in body.items() if v is not None}
        answers[key] = await api.post("/v1/payments", json=body, headers=auth(agent_key))
    assert answers["small"].status_code == 400
    assert answers["small"].json()["error"]["param"] == "amount"
    assert "below the provider's smallest charge in usd (50)" in answers["small"].text
    assert answers["lines"].status_code == 400
    assert answers["lines"].json()["error"]["param"] == "line_items"
    for key in ("minimum", "yen minimum", "no minimum known"):
        assert answers[key].status_code == 202, (key, answers[key].text)


async def test_operator_text_that_postgres_cannot_store_is_refused(
    api: httpx.AsyncClient, operator_key: str, pool: Pool
) -> None:
    """Notes, reasons and descriptions of operators' requests: NUL or a lone surrogate is a
    400 naming the field, never a 500 from the database."""
    before = await snapshot(pool)
    for bad in ("a\u0000b", "\ud800"):
        for path, body, param in (
            ("/v1/review/pay_x/approve", {"note": bad}, "note"),
            ("/v1/ops/payments/pay_x/cancel", {"reason": bad}, "reason"),
            (
                "/v1/agents/agt_x/deposits",
                {"amount": 100, "currency": "usd", "description": bad},
                "description",
            ),
            (
                "/v1/prices",
                {"sku": "s1", "currency": "usd", "unit_amount": 100, "description": bad},
                "description",
            ),
        ):
            response = await api.post(
                path,
                content=json.dumps(body).encode(),
                headers={**auth(operator_key), "Content-Type": "application/json"},
            )
            assert_error_shape(response, 400, (operator_key,))
            assert response.json()["error"]["param"] == param, (path, response.text)
    assert await snapshot(pool) == before


async def test_errors_name_the_parameter(api: httpx.AsyncClient, agent_key: str) -> None:
    cases = [
        ({**GOOD, "amount": 0}, "amount"),
        ({**GOOD, "currency": "USD "}, "currency"),
        ({**GOOD, "currency": "kwd", "amount": 1005}, "amount"),
        ({**GOOD, "currency": "isk", "amount": 15050}, "amount"),
        ({**GOOD, "metadata": {"k": "v" * 501}}, "metadata"),
        ({**GOOD, "surprise": 1}, "surprise"),
    ]
    for body, param in cases:
        response = await api.post("/v1/payments", json=body, headers=auth(agent_key))
        assert response.json()["error"]["param"] == param, response.text


async def test_a_refund_with_a_null_amount_is_refused_not_taken_as_all(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """Leaving `amount` out refunds all that remains; a null, from an agent whose partial
    amount came out empty, must not."""
    created = (await api.post("/v1/payments", json=GOOD, headers=auth(agent_key))).json()
    response = await api.post(
        f"/v1/payments/{created['id']}/refunds", json={"amount": None}, headers=auth(agent_key)
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "amount"
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) AS n FROM payment_refunds")
        assert await cur.fetchone() == {"n": 0}
    schema = (await api.get("/openapi.json")).json()["components"]["schemas"]["RefundCreate"]
    assert "anyOf" not in schema["properties"]["amount"]  # not documented as nullable


async def test_a_null_body_is_the_same_request_as_no_body(
    api: httpx.AsyncClient, agent_key: str
) -> None:
    """Validation reads `null` as no body (a cancel, a refund of all that remains), so the
    idempotency fingerprint must too: a retry sending `null` replays, not a 409."""
    created = (await api.post("/v1/payments", json=GOOD, headers=auth(agent_key))).json()
    headers = {**auth(agent_key), "Idempotency-Key": "cancel-once"}
    path = f"/v1/payments/{created['id']}/cancel"
    first = await api.post(path, headers=headers)
    assert first.status_code == 202, first.text
    again = await api.post(
        path, content=b"null", headers={**headers, "Content-Type": "application/json"}
    )
    assert again.status_code == 202, again.text
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.content == first.content


async def test_a_number_too_long_to_read_is_an_invalid_body(
    api: httpx.AsyncClient, agent_key: str
) -> None:
    body = b'{"amount": ' + b"9" * 5000 + b', "currency": "usd", "payment_method": "pm_card_visa"}'
    response = await api.post(
        "/v1/payments",
        content=body,
        headers={**auth(agent_key), "Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "body_invalid"


async def test_a_trailing_slash_is_a_404_not_a_redirect(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """A redirect would have a client resend its POST (or turn it into a GET)."""
    response = await api.post("/v1/payments/", json=GOOD, headers=auth(agent_key))
    assert_error_shape(response, 404, ())
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) AS n FROM payment_jobs")
        assert await cur.fetchone() == {"n": 0}


async def test_currency_exponents_are_respected(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    for body in (
        {**GOOD, "currency": "jpy", "amount": 500},  # zero-decimal: ¥500
        {**GOOD, "currency": "kwd", "amount": 1250},  # three-decimal: ends in 0
        {**GOOD, "currency": "isk", "amount": 15000},  # whole krónur, two decimals: 150 kr
        {**GOOD, "amount": 99_999_999},  # the provider's maximum
        {**GOOD, "amount": 2000.0},  # JSON has one number type: this is the integer 2000
    ):
        response = await api.post("/v1/payments", json=body, headers=auth(agent_key))
        assert response.status_code == 202, response.text
        assert response.json()["currency"] == body["currency"]
    assert (await snapshot(pool))[0] == 5


async def test_sql_looking_text_is_stored_as_text(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """Where free text is allowed, SQL is just text: stored verbatim, nothing run."""
    text = "Robert'); DROP TABLE payment_jobs; -- \\ $1 %s %(x)s"
    response = await api.post(
        "/v1/payments",
        json={**GOOD, "description": text, "metadata": {"note": text, "'; --": "x"}},
        headers=auth(agent_key),
    )
    assert response.status_code == 202
    fetched = await api.get(f"/v1/payments/{response.json()['id']}", headers=auth(agent_key))
    assert fetched.json()["description"] == text
    assert fetched.json()["metadata"] == {"note": text, "'; --": "x"}
    # Path and query parameters too.
    for path in (
        "/v1/payments/pay_x' OR '1'='1",
        "/v1/payments/pay_1%3B%20DROP%20TABLE%20payment_jobs",
    ):
        assert_error_shape(await api.get(path, headers=auth(agent_key)), 404, ())
    assert_error_shape(await api.get("/v1/payments/pay_%00", headers=auth(agent_key)), 400, ())
    listing = await api.get(
        "/v1/payments", params={"status": "received' OR 1=1 --"}, headers=auth(agent_key)
    )
    assert_error_shape(listing, 400, ())
    assert (await snapshot(pool))[0] == 1


async def test_oversized_bodies_are_refused_before_parsing(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    before = await snapshot(pool)
    ten_mb = b'{"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", ' + (
        b'"description": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    )
    announced = await api.post(
        "/v1/payments",
        content=ten_mb,
        headers={**auth(agent_key), "Content-Type": "application/json"},
    )
    assert_error_shape(announced, 413, ())
    assert announced.json()["error"]["code"] == "body_too_large"

    sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(160):  # 10 MiB in 64 KiB chunks, no Content-Length
            sent += 1
            yield b" " * 65536

    streamed = await api.post(
        "/v1/payments",
        content=chunks(),
        headers={**auth(agent_key), "Content-Type": "application/json"},
    )
    assert_error_shape(streamed, 413, ())
    assert sent < 5  # the server stopped reading once the limit was passed
    assert await snapshot(pool) == before


async def test_deep_nesting_non_utf8_and_broken_json_are_refused(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    before = await snapshot(pool)
    utf8 = json.dumps({**GOOD, "description": "café"}, ensure_ascii=False)
    bodies = {
        "deep arrays": b'{"metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "deep objects": b'{"metadata": ' + b'{"a":' * 100 + b"1" + b"}" * 100 + b"}",
        "latin-1": utf8.encode("latin-1"),
        "invalid bytes": b'{"amount": 2000, "currency": "usd\xff\xfe"}',
        "utf-16": utf8.encode("utf-16"),
        "lone surrogate": json.dumps({**GOOD, "description": "\ud800"}).encode(),
        "broken json": b'{"amount": 2000, "currency": ',
        "empty": b"",
    }
    for what, body in bodies.items():
        response = await api.post(
            "/v1/payments",
            content=body,
            headers={**auth(agent_key), "Content-Type": "application/json"},
        )
        assert response.status_code == 400, (what, response.text)
        assert_error_shape(response, 400, ())
    assert await snapshot(pool) == before


async def test_a_json_body_without_a_content_type_is_read_and_another_type_is_a_415(
    api: httpx.AsyncClient, agent_key: str, pool: Pool
) -> None:
    """`requests.post(url, data=json.dumps(body))` and `curl -d` without `-H` send no
    Content-Type (FastAPI 0.132 refused those: "Input should be a valid dictionary"). A body
    sent as a form or as text is refused as such, not as an invalid field."""
    before = await snapshot(pool)
    for what, content_type, body in (
        ("form", "application/x-www-form-urlencoded", "amount=2000&currency=usd"),
        ("JSON as a form", "application/x-www-form-urlencoded", json.dumps(GOOD)),
        ("JSON as text", "text/plain; charset=utf-8", json.dumps(GOOD)),
        ("deep JSON as text", "text/plain", "[" * 60_000),
    ):
        response = await api.post(
            "/v1/payments",
            content=body,
            headers={**auth(agent_key), "Content-Type": content_type, "Idempotency-Key": what},
        )
        assert_error_shape(response, 415, ())
        error = response.json()["error"]
        assert (error["type"], error["code"], error["param"]) == (
            "invalid_request_error",
            "content_type_invalid",
            "Content-Type",
        ), what
        assert "Content-Type: application/json" in error["message"]
    assert await snapshot(pool) == before

    untyped = await api.post(
        "/v1/payments",
        content=json.dumps(GOOD).encode(),
        headers={**auth(agent_key), "Idempotency-Key": "untyped"},
    )
    assert "content-type" not in untyped.request.headers
    assert untyped.status_code == 202, untyped.text
    assert untyped.json()["status"] == "received"
    # The same request typed as JSON is the same request: replayed, not a second payment.
    typed = await api.post(
        "/v1/payments",
        json=GOOD,
        headers={**auth(agent_key), "Idempotency-Key": "untyped"},
    )
    assert typed.json()["id"] == untyped.json()["id"]
    assert typed.headers.get("Idempotent-Replayed") == "true"
    # Untyped bodies get the JSON checks too.
    deep = await api.post("/v1/payments", content=b"[" * 100 + b"]" * 100, headers=auth(agent_key))
    assert_error_shape(deep, 400, ())
    assert deep.json()["error"]["code"] == "body_too_deep"


def test_json_depth_ignores_brackets_inside_strings() -> None:
    assert json_depth('{"a": "[[[[{{{{", "b": [1, [2]]}') == 3
    assert json_depth('{"a": "\\"[[[["}') == 1
    assert json_depth("[]") == 1
    assert json_depth("") == 0
    # An unterminated string runs to the end: its brackets nest nothing either.
    assert json_depth('[{"a": "[[[[') == 2
    # With a limit, the scan stops at the first depth above it; and where a bracket closes
    # nothing (a parser stops at that error, so nothing after it nests deeper).
    assert json_depth("[" * 100_000, stop_above=16) == 17
    assert json_depth("[]]" + "[" * 50) == 1


def test_json_depth_is_linear_on_unterminated_strings() -> None:
    """A body of escaped quotes that never closes is scanned once, not once per quote (that
    took seconds for 64 KiB and would take minutes for a 1 MiB webhook body, holding the event
    loop). Run apart, so that a quadratic scan is stopped by the timeout, not waited for."""
    code = "import sys; from api.limits import json_depth; print(json_depth(sys.stdin.read()))"
    body = '["' + '\\"' * (512 * 1024)  # [" then \" 512 Ki times: 1 MiB, never closed
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=body,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.strip() == "1"


async def test_a_database_away_is_a_503_to_retry(
    api: httpx.AsyncClient, agent_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Postgres down or restarting, no connection free in time, a transient refusal, a
    transaction the server ended for idling: a 503 with Retry-After (the client retries with
    its Idempotency-Key), never a 500."""
    import psycopg_pool

    import api.routes.payments as routes

    for error in (
        psycopg.OperationalError("server closed the connection unexpectedly: secret-host"),
        psycopg_pool.PoolTimeout("couldn't get a connection after 5.00 sec"),
        psycopg.errors.IdleInTransactionSessionTimeout("terminating: idle-in-transaction"),
    ):

        async def away(*args: Any, exc: Exception = error, **kwargs: Any) -> Any:
            raise exc

        monkeypatch.setattr(routes.payments, "insert", away)
        response = await api.post("/v1/payments", json=GOOD, headers=auth(agent_key))
        assert_error_shape(response, 503, ("secret-host", "PoolTimeout"))
        assert response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "database_unavailable"
        assert "Idempotency-Key" in response.json()["error"]["message"]


async def test_an_unexpected_error_discloses_nothing(
    api: httpx.AsyncClient, agent_key: str, pool: Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import api.routes.payments as routes

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("SELECT secret FROM vault WHERE password = 'hunter2'")

    monkeypatch.setattr(routes.payments, "insert", broken)
    response = await api.post("/v1/payments", json=GOOD, headers=auth(agent_key))
    assert_error_shape(response, 500, ("hunter2", "vault", "RuntimeError"))
    assert response.json()["error"] == {
        "type": "api_error",
        "code": "internal_error",
        "message": "An internal error occurred.",
        "param": None,
    }


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/nowhere"), ("DELETE", "/v1/payments"), ("PUT", "/v1/payments/pay_1")],
)
async def test_routing_errors_use_the_one_shape(
    api: httpx.AsyncClient, agent_key: str, method: str, path: str
) -> None:
    response = await api.request(method, path, headers=auth(agent_key))
    assert response.status_code in (404, 405)
    assert_error_shape(response, response.status_code, ())


async def test_nul_in_any_path_or_query_is_a_400_on_every_route(
    api: httpx.AsyncClient, operator_key: str
) -> None:
    """Postgres text cannot hold NUL: no route may pass one on and fail with a 500."""
    for method, path in (
        ("GET", "/v1/balance?agent_id=%00"),
        ("GET", "/v1/ops/payments/%00"),
        ("POST", "/v1/review/%00/approve"),
        ("POST", "/v1/ops/payments/%00/cancel"),
        ("POST", "/v1/agents/%00/deposits"),
    ):
        response = await api.request(method, path, json={}, headers=auth(operator_key))
        assert_error_shape(response, 400, ())
        assert response.json()["error"]["code"] == "parameter_invalid", path


async def test_out_of_range_query_parameters_are_refused_not_crashed_on(
    api: httpx.AsyncClient, agent_key: str
) -> None:
    for path in (
        "/v1/balance/transactions?starting_after=99999999999999999999",
        "/v1/prices?currency=%00ab",
    ):
        response = await api.get(path, headers=auth(agent_key))
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
