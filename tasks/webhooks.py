"""Provider webhooks: Stripe's signature scheme, and storing each event once.

The API process must never load `stripe`, so the signature check is Stripe's documented scheme
implemented here (tests check it agrees with `stripe.WebhookSignature` and with what the
sandbox signs): the `Stripe-Signature` header is `t=<unix time>,v1=<hex>[,v1=<hex>…]`, and a
`v1` must equal HMAC-SHA256(secret, f"{t}.{raw body}"), compared in constant time; a `t` older
than the tolerance (300 s by default) is refused, against replays.

An event is stored once by its id (`webhook_events`); in the same transaction, an event about
a payment we know defers "reconcile" for it, unless that cannot change anything: the payment
is in a state reconcile does not act on, or a reconcile (or, while charging, a charge) job for
it is already waiting. Reconcile reads the provider's
PaymentIntent itself and never trusts the event's copy of it, so duplicates have one effect
and events out of order cannot move a payment backwards. A refund event (`charge.refunded`,
`refund.created`, …) also defers the sync of refunds made outside agentpay, which lists the
provider's refunds itself. A dispute event (`charge.dispute.*`: a customer's chargeback, its
updates and its outcome) is recorded in its payment's events (`dispute`), for the agent and
the operator to see; a lost one is booked in the ledger (`dispute_lost`: the money left
provider clearing and platform fees; see docs/ledger.md), nothing else follows from it. An
event saying an intent took or holds money, about a payment that ended without money,
defers `check_late_money` (tasks/reconcile.py), which reads the intent and cancels an
authorization or puts money taken before an operator.
Event types we do not act on are stored and ignored.

What is stored is a copy Postgres can hold (`storable`): a NUL character or a lone surrogate
(JSON may escape either, `"\\u0000"`, `"\\ud800"`, in metadata someone typed) in any string or
key becomes U+FFFD. The signature was checked on the raw bytes before; refusing the event
instead would make the provider deliver it again, forever.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from typing import Any

from psycopg.types.json import Jsonb

from tasks import disputes, reconcile, refunds
from tasks.app import defer
from tasks.db import Conn

SCHEME = "v1"
DEFAULT_TOLERANCE = 300

# Event types that can say something about a payment's PaymentIntent.
HANDLED_PREFIXES = ("payment_intent.", "charge.", "refund.")
# Events that bring no news reconcile could act on. Stored like the others, but they never
# bring a reconcile. `payment_intent.created`: an intent now exists, nothing more — the charge
# job that created it settles it, and a charge left without a job is re-driven by the
# stuck-payment sweep (Stripe sends one per payment, usually while the charge job runs). The
# charge events: Stripe sends them beside the `payment_intent.*` event of the same outcome
# (`charge.succeeded` with `payment_intent.succeeded`, `charge.captured` with the capture's,
# `charge.expired` with `payment_intent.canceled`, …), and an endpoint subscribed to every
# event (`stripe listen` by default) receives both: each would cost a reconcile job and a
# provider call for nothing. `charge.refunded` is not among them: it is how a refund made in
# the Dashboard shows.
NO_OUTCOME = frozenset(
    {
        "payment_intent.created",
        "charge.succeeded",
        "charge.captured",
        "charge.pending",
        "charge.failed",
        "charge.updated",
        "charge.expired",
    }
)


# A customer disputes a charge (a chargeback), the dispute changes, or it ends.
DISPUTE_PREFIX = "charge.dispute."
DISPUTE_OPENED = "charge.dispute.created"


class SignatureError(ValueError):
    """The webhook is not signed with our secret, or is too old. `code` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def compute_signature(payload: bytes | str, secret: str, timestamp: int) -> str:
    body = payload.encode("utf-8") if isinstance(payload, str) else payload
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode("utf-8"), signed, hashlib.sha256).hexdigest()


def sign(payload: bytes | str, secret: str, timestamp: int | None = None) -> str:
    """A `Stripe-Signature` header for `payload` (for tests and tools)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},{SCHEME}={compute_signature(payload, secret, t)}"


def verify(
    payload: bytes,
    header: str | None,
    secret: str,
    *,
    tolerance: int = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> None:
    """Raise SignatureError unless `header` signs `payload` with `secret` within `tolerance`
    seconds."""
    if not header:
        raise SignatureError("signature_missing", "No Stripe-Signature header.")
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                timestamp = None
        elif key == SCHEME:
            signatures.append(value)
    if timestamp is None:
        raise SignatureError("signature_invalid", "The Stripe-Signature header has no timestamp.")
    if not signatures:
        raise SignatureError("signature_invalid", f"No {SCHEME} signature in Stripe-Signature.")
    expected = compute_signature(payload, secret, timestamp)
    if not any(hmac.compare_digest(expected, s) for s in signatures):
        raise SignatureError("signature_invalid", "No signature matches the payload.")
    current = time.time() if now is None else now
    if tolerance and timestamp < current - tolerance:
        raise SignatureError(
            "signature_expired", f"The signature's timestamp is older than {tolerance} seconds."
        )


# What Postgres text and jsonb cannot hold: NUL, and surrogates (a string from JSON holds one
# only unpaired: the parser joins an escaped pair into one character).
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _clean(text: str) -> str:
    return _UNSTORABLE.sub("\ufffd", text)


def storable(value: Any) -> Any:
    """A copy of `value` (parsed JSON) with every NUL character and lone surrogate in its
    strings and keys replaced by U+FFFD, so that Postgres can store it. (Two keys that differ
    only there become one.) Not recursive: a signed body may nest as deep as the parser
    allows."""
    todo: list[tuple[Any, Any]] = []

    def copy(item: Any) -> Any:
        if isinstance(item, str):
            return _clean(item)
        if isinstance(item, dict | list):
            empty: dict[str, Any] | list[Any] = {} if isinstance(item, dict) else []
            todo.append((item, empty))  # filled below
            return empty
        return item

    root = copy(value)
    while todo:
        source, target = todo.pop()
        if isinstance(source, dict):
            for key, item in source.items():
                target[_clean(key)] = copy(item)
        else:
            target.extend(copy(item) for item in source)
    return root


def _intent_id(event: dict[str, Any]) -> str | None:
    obj = (event.get("data") or {}).get("object") or {}
    if not isinstance(obj, dict):
        return None
    if obj.get("object") == "payment_intent":
        return obj.get("id") if isinstance(obj.get("id"), str) else None
    pi = obj.get("payment_intent")
    if isinstance(pi, dict):
        pi = pi.get("id")
    return pi if isinstance(pi, str) else None


def _metadata_payment_id(event: dict[str, Any]) -> str | None:
    obj = (event.get("data") or {}).get("object") or {}
    metadata = obj.get("metadata") if isinstance(obj, dict) else None
    value = metadata.get("payment_id") if isinstance(metadata, dict) else None
    return value if isinstance(value, str) else None


async def _payment_for(conn: Conn, intent_id: str | None, payment_id: str | None) -> str | None:
    """Our payment the event is about: by the intent id we stored, else by our metadata."""
    cur = await conn.execute(
        """SELECT id FROM payment_jobs
            WHERE (%s::text IS NOT NULL AND provider_payment_id = %s)
               OR (%s::text IS NOT NULL AND id = %s)
            ORDER BY (provider_payment_id IS NOT DISTINCT FROM %s) DESC
            LIMIT 1""",
        (intent_id, intent_id, payment_id, payment_id, intent_id),
    )
    row = await cur.fetchone()
    return row["id"] if row else None


async def store(conn: Conn, event: dict[str, Any]) -> dict[str, Any]:
    """Store a verified event once and, the first time, defer reconcile for its payment when
    that can change anything (see `_reconcile_needed`), and for a refund event the sync of
    refunds made outside agentpay (`tasks.refunds.sync_refunds`). Returns {"duplicate": bool,
    "payment_id": str | None, "reconcile": bool, "sync_refunds": bool}. Runs in the caller's
    transaction. What is stored, and read, is the event's `storable` copy."""
    event = storable(event)
    event_type = str(event["type"])
    intent_id = _intent_id(event)
    handled = event_type.startswith(HANDLED_PREFIXES)
    payment_id = (
        await _payment_for(conn, intent_id, _metadata_payment_id(event)) if handled else None
    )
    cur = await conn.execute(
        """INSERT INTO webhook_events (id, type, provider_object_id, payment_id, livemode,
                                       payload, handled)
           VALUES (%s, %s, %s, %s, %s, %s, %s)
           ON CONFLICT (id) DO NOTHING
           RETURNING id""",
        (
            event["id"],
            event_type,
            intent_id,
            payment_id,
            bool(event.get("livemode")),
            Jsonb(event),
            handled and payment_id is not None,
        ),
    )
    if await cur.fetchone() is None:
        return {
            "duplicate": True,
            "payment_id": payment_id,
            "reconcile": False,
            "sync_refunds": False,
        }
    deferred = synced = False
    if (
        handled
        and payment_id is not None
        and event_type not in NO_OUTCOME
        and not event_type.startswith(DISPUTE_PREFIX)
        and await _reconcile_needed(conn, payment_id)
    ):
        await defer(conn, "reconcile", payment_id=payment_id)
        deferred = True
    if (
        payment_id is not None
        and event_type in refunds.REFUND_EVENTS
        and await _sync_needed(conn, payment_id)
    ):
        await defer(conn, refunds.SYNC_TASK, payment_id=payment_id)
        synced = True
    if payment_id is not None and event_type.startswith(DISPUTE_PREFIX):
        await disputes.record(conn, payment_id, event)
    if (
        payment_id is not None
        and intent_id is not None
        and event_type in reconcile.LATE_EVENTS
        and await reconcile.late_money_check_needed(conn, payment_id, intent_id)
    ):
        await defer(conn, reconcile.LATE_TASK, payment_id=payment_id, intent_id=intent_id)
    return {
        "duplicate": False,
        "payment_id": payment_id,
        "reconcile": deferred,
        "sync_refunds": synced,
    }


async def _sync_needed(conn: Conn, payment_id: str) -> bool:
    """Whether a refund event can bring news the sync acts on — refunds made elsewhere (the
    payment can hold them, or will once reconciled), or a counted refund that failed since
    (a `refunded` payment too) — and no sync job for it is waiting already."""
    cur = await conn.execute("SELECT status FROM payment_jobs WHERE id = %s", (payment_id,))
    row = await cur.fetchone()
    if row is None or row["status"] not in refunds.SYNCABLE:
        return False
    return not await refunds.sync_waiting(conn, payment_id)


async def _reconcile_needed(conn: Conn, payment_id: str) -> bool:
    """Whether the payment is in a state reconcile acts on, no reconcile job for it is waiting
    already (it will read the provider after this event anyway), and, while `charging`, no
    charge job is waiting for it (that one reads the provider after this event and settles
    it). A charge job already running may hold an older answer, so it does not count."""
    cur = await conn.execute(
        """SELECT p.status = ANY(%s)
                  AND NOT EXISTS (
                      SELECT 1 FROM procrastinate_jobs j
                       WHERE j.status = 'todo' AND j.task_name = 'reconcile'
                         AND j.args->>'payment_id' = p.id)
                  AND NOT (p.status = 'charging' AND EXISTS (
                      SELECT 1 FROM procrastinate_jobs j
                       WHERE j.status = 'todo' AND j.task_name = 'charge'
                         AND j.args->>'payment_id' = p.id)) AS needed
             FROM payment_jobs p WHERE p.id = %s""",
        (sorted(reconcile.RECONCILABLE), payment_id),
    )
    row = await cur.fetchone()
    return bool(row and row["needed"])
