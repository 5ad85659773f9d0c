"""Everything one sandbox instance remembers, in memory, behind one lock."""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sandbox.cards import TEST_CARDS, payment_method_object
from sandbox.faults import FaultInjector
from sandbox.idempotency import IdempotencyStore
from sandbox.ids import new_id, now
from sandbox.objects import Charge, Dispute, PaymentIntent, Refund
from sandbox.webhooks import WebhookDispatcher, new_webhook_secret

__all__ = ["API_VERSION", "RequestInfo", "SandboxState", "StoredEvent", "dumps"]

API_VERSION = "2026-10-28.endive"


def dumps(obj: Any) -> str:
    """Stripe's JSON formatting (pretty-printed), used for responses and webhook bodies alike."""
    return json.dumps(obj, indent=2)


@dataclass(frozen=True)
class RequestInfo:
    """The API request that caused a change, as recorded in ``event.request``."""

    id: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class StoredEvent:
    id: str
    type: str
    data: dict[str, Any]
    body: str  # the exact JSON served by GET /v1/events/{id} and POSTed to webhooks


class SandboxState:
    """In-memory store of one sandbox: objects, events, idempotency keys, faults, webhooks.

    All mutation happens under ``lock`` (a re-entrant thread lock, held only for in-memory work,
    never across an ``await``), so request handlers on the event loop and test code on other
    threads can share it safely.
    """

    def __init__(
        self,
        webhook_secret: str | None = None,
        webhook_endpoints: list[str] | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self.webhook_secret = webhook_secret or new_webhook_secret()
        self.payment_intents: dict[str, PaymentIntent] = {}
        self.charges: dict[str, Charge] = {}
        self.refunds: dict[str, Refund] = {}
        self.disputes: dict[str, Dispute] = {}
        self.events: dict[str, StoredEvent] = {}
        self.idempotency = IdempotencyStore()
        self.faults = FaultInjector()
        self.webhooks = WebhookDispatcher(self.webhook_secret, list(webhook_endpoints or []))
        self.requests: Counter[int] = Counter()

    # --- events --------------------------------------------------------------------------

    def emit(self, type_: str, obj: dict[str, Any], request: RequestInfo) -> StoredEvent:
        """Record an event about ``obj`` (a JSON snapshot) and hand it to webhook delivery."""
        with self.lock:
            pending = sum(1 for e in self.webhooks.endpoints() if e.wants(type_))
            event_id = new_id("evt")
            data = {
                "id": event_id,
                "object": "event",
                "api_version": API_VERSION,
                "created": now(),
                "data": {"object": obj},
                "livemode": False,
                "pending_webhooks": pending,
                "request": {"id": request.id, "idempotency_key": request.idempotency_key},
                "type": type_,
            }
            event = StoredEvent(event_id, type_, data, dumps(data))
            self.events[event_id] = event
            self.webhooks.notify(event_id, type_, event.body)
            return event

    # --- lookups -------------------------------------------------------------------------

    def lookup(self, object_id: str) -> dict[str, Any] | None:
        """Any object by id, as JSON (used by ``expand``)."""
        with self.lock:
            if object_id in self.payment_intents:
                return self.payment_intents[object_id].to_dict()
            if object_id in self.charges:
                return self.charges[object_id].to_dict()
            if object_id in self.refunds:
                return self.refunds[object_id].to_dict()
            if object_id in self.disputes:
                return self.disputes[object_id].to_dict()
            if object_id in TEST_CARDS:
                return payment_method_object(object_id, now())
            return None

    # --- operator views ------------------------------------------------------------------

    def count_request(self, status: int) -> None:
        with self.lock:
            self.requests[status] += 1

    def stats(self) -> dict[str, Any]:
        with self.lock:
            by_status = Counter(pi.status for pi in self.payment_intents.values())
            return {
                "payment_intents": {
                    "total": len(self.payment_intents),
                    "by_status": dict(sorted(by_status.items())),
                },
                "charges": len(self.charges),
                "refunds": {
                    "total": len(self.refunds),
                    "amount": sum(r.amount for r in self.refunds.values()),
                },
                "disputes": {
                    "total": len(self.disputes),
                    "by_status": dict(
                        sorted(Counter(d.status for d in self.disputes.values()).items())
                    ),
                },
                "events": len(self.events),
                "requests": {
                    "total": sum(self.requests.values()),
                    "by_status_code": {str(k): v for k, v in sorted(self.requests.items())},
                },
                "faults_injected": self.faults.snapshot()["injected"],
                "idempotency": self.idempotency.stats(),
                "webhooks": self.webhooks.stats(),
            }

    def reset(self) -> None:
        """Back to a fresh instance: objects, events, keys, faults, stats, webhook settings."""
        with self.lock:
            self.payment_intents.clear()
            self.charges.clear()
            self.refunds.clear()
            self.disputes.clear()
            self.events.clear()
            self.requests.clear()
            self.idempotency.clear()
            self.faults.reset()
            self.webhooks.reset()
