"""The price catalog: operators set and retire prices; every agent may read what is on sale."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import ConfigDict, Field

from api.deps import AgentDep, OperatorDep, PoolDep
from api.errors import ApiError, responses
from api.idempotency import IdempotencyDep
from api.models import ApiModel, Currency, MinorUnits, SafeText
from tasks import money, pricing

router = APIRouter(prefix="/v1/prices", tags=["prices"])

ERRORS = responses(400, 401, 403, 413, 429, 500)
SET_ERRORS = responses(400, 401, 403, 409, 413, 429, 500)


class PriceSet(ApiModel):
    model_config = ConfigDict(extra="forbid")

    sku: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
    currency: Currency
    unit_amount: MinorUnits = Field(description="Minor units, e.g. 1999 = $19.99")
    description: SafeText | None = Field(default=None, max_length=500)
    active: bool = True


class Price(ApiModel):
    object: Literal["price"] = "price"
    sku: str
    currency: str
    unit_amount: int
    description: str | None
    active: bool


class PriceList(ApiModel):
    object: Literal["list"] = "list"
    data: list[Price]


def _public(price: pricing.Price) -> dict[str, Any]:
    return {"object": "price", **price.__dict__}


@router.post("", response_model=Price, responses=SET_ERRORS)
async def set_price(body: PriceSet, operator: OperatorDep, idem: IdempotencyDep) -> Response:
    """Create or replace the price of a SKU in a currency (operators only); a description
    left out keeps the previous one. Setting the same price again changes nothing. A change
    is recorded, with the price it replaced, in the operator audit by `operator:<name>`."""
    problem = money.amount_problem(body.unit_amount, body.currency)
    if problem:
        raise ApiError(400, "parameter_invalid", f"unit_amount: {problem}", param="unit_amount")
    async with idem.transaction() as conn:
        price = await pricing.set_price(
            conn,
            body.sku,
            body.currency,
            body.unit_amount,
            description=body.description,
            active=body.active,
            actor=operator.actor,
        )
        return await idem.respond(Price.model_validate(_public(price)))


@router.get("", response_model=PriceList, responses=ERRORS)
async def list_prices(
    agent: AgentDep,
    pool: PoolDep,
    currency: str | None = Query(default=None, pattern=r"^[a-z]{3}$"),
) -> dict[str, Any]:
    """The catalog: what is on sale; operators also see retired (inactive) prices."""
    async with pool.connection() as conn:
        prices = await pricing.list_prices(
            conn, currency=currency, include_inactive=agent.is_operator
        )
    return {"object": "list", "data": [_public(p) for p in prices]}
