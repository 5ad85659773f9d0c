"""POST /v1/webhooks/stripe: the provider tells us something happened.

The signature is checked (tasks/webhooks.py: Stripe's scheme, without loading stripe), the
event is stored once by its id and reconcile (for a refund event, also the sync of refunds
made outside agentpay) is deferred for its payment, in one short transaction; the answer goes
back at once. A bad or stale signature is a 400 in the usual error shape; an event type we do
not act on is stored and answered 200.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Header, Request

from api.deps import PoolDep
from api.errors import ApiError
from tasks import webhooks

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


# The provider's endpoint, not part of the agents' API: it is authenticated by the signature
# of a body only the provider can produce, so it stays out of /openapi.json (as Stripe's own
# API documents no webhook receiver).
@router.post("/stripe", include_in_schema=False)
async def stripe_webhook(
    request: Request,
    pool: PoolDep,
    stripe_signature: str | None = Header(default=None),
) -> dict[str, Any]:
    """Receive one provider event (signed with `Stripe-Signature`)."""
    settings = request.app.state.settings
    secret = settings.stripe_webhook_secret
    if not secret:
        raise ApiError(
            503,
            "webhook_secret_missing",
            "STRIPE_WEBHOOK_SECRET is not set; webhooks cannot be verified.",
            type_="api_error",
        )
    payload = await request.body()
    try:
        webhooks.verify(
            payload, stripe_signature, secret, tolerance=settings.webhook_tolerance_seconds
        )
    except webhooks.SignatureError as error:
        raise ApiError(400, error.code, error.message, param="Stripe-Signature") from error
    try:
        event = json.loads(payload)
    except (ValueError, RecursionError) as error:  # RecursionError: nested too deep
        raise ApiError(400, "payload_invalid", "The body is not JSON.") from error
    if (
        not isinstance(event, dict)
        or not isinstance(event.get("id"), str)
        or not isinstance(event.get("type"), str)
    ):
        raise ApiError(400, "payload_invalid", "The body is not an event (id, type).")
    async with pool.connection() as conn, conn.transaction():
        stored = await webhooks.store(conn, event)
    return {"received": True, "id": webhooks.storable(event["id"]), **stored}
