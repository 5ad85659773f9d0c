"""Request and response bodies of the HTTP contract."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from tasks import money


class LineItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = Field(min_length=1, max_length=500)
    unit_amount: StrictInt = Field(gt=0, le=money.MAX_AMOUNT)
    quantity: StrictInt = Field(default=1, gt=0, le=10_000)


class PaymentCreate(BaseModel):
    """A payment request. Give `amount` (minor units) or `line_items`, not both."""

    model_config = ConfigDict(extra="forbid")

    amount: StrictInt | None = Field(default=None, description="Minor units, e.g. 1999 = $19.99")
    line_items: list[LineItem] | None = Field(default=None, min_length=1, max_length=100)
    currency: str = Field(min_length=3, max_length=3, description="Lowercase ISO 4217, e.g. usd")
    payment_method: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_]+$")
    capture_method: Literal["automatic", "manual"] = "automatic"
    description: str | None = Field(default=None, max_length=1000)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=50)

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str) -> str:
        if value not in money.CURRENCIES:
            raise ValueError("must be a lowercase ISO 4217 currency code such as 'usd'")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str]) -> dict[str, str]:
        for key, item in value.items():
            if not key or len(key) > 40:
                raise ValueError("metadata keys are 1 to 40 characters")
            if len(item) > 500:
                raise ValueError("metadata values are at most 500 characters")
        return value

    @model_validator(mode="after")
    def _amounts(self) -> PaymentCreate:
        if (self.amount is None) == (self.line_items is None):
            raise ValueError("give exactly one of amount or line_items")
        if self.amount is not None:
            problem = money.amount_problem(self.amount, self.currency)
            if problem:
                raise ValueError(problem)
        else:
            assert self.line_items is not None
            total = sum(i.unit_amount * i.quantity for i in self.line_items)
            problem = money.amount_problem(total, self.currency)
            if problem:
                raise ValueError(f"line items total: {problem}")
        return self


class Failure(BaseModel):
    code: str
    message: str | None


class Payment(BaseModel):
    id: str
    object: Literal["payment"] = "payment"
    agent_id: str
    status: str
    currency: str
    amount_subtotal: int | None
    amount_fee: int | None
    amount_tax: int | None
    amount_total: int | None
    amount_refunded: int
    capture_method: str
    payment_method: str
    provider_payment_id: str | None
    failure: Failure | None
    description: str | None
    metadata: dict[str, str]
    created_at: datetime
    updated_at: datetime


class PaymentEvent(BaseModel):
    id: int
    type: str
    from_status: str | None
    to_status: str | None
    actor: str
    reason: str | None
    data: dict[str, Any]
    created_at: datetime


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PaymentEvent]


class ErrorDetail(BaseModel):
    type: str
    code: str
    message: str
    param: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail
