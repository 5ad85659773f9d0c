"""Request and response bodies of the HTTP contract."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from tasks import money


class ApiModel(BaseModel):
    """Every request and response body. A response field with a default is still always
    sent, so the schema of a response lists it as required (generated clients type it so);
    request schemas are unchanged."""

    model_config = ConfigDict(json_schema_serialization_defaults_required=True)


# Postgres text and jsonb cannot hold NUL characters, nor lone surrogates (JSON may escape
# one: "\ud800"); refuse both in every string we store. The pattern check refuses both.
NO_NUL = r"^[^\u0000]*$"
SafeText = Annotated[str, Field(pattern=NO_NUL)]


def storable(text: str) -> bool:
    """Whether Postgres can store `text` (what SafeText checks, for strings without it)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# The catalog's SKU format (schema/migrations/0004_ledger.sql: prices.sku).
SKU_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$"
METADATA_MAX_KEYS = 50
METADATA_KEY_MAX = 40
METADATA_VALUE_MAX = 500


def whole_number(value: Any) -> Any:
    """JSON has one number type: 2000.0 is the integer 2000 (JSON Schema agrees), 19.99 is
    not an integer, and neither are strings or booleans (StrictInt refuses those)."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**53:
        return int(value)
    return value


# Minor units the provider can charge at once, and a line's quantity: strict integers,
# except that a whole float is whole. (The bounds come before the BeforeValidator so that
# they stay on the integer, and in the JSON schema as minimum and maximum.)
MinorUnits = Annotated[StrictInt, Field(ge=1, le=money.MAX_AMOUNT), BeforeValidator(whole_number)]
Quantity = Annotated[StrictInt, Field(ge=1, le=10_000), BeforeValidator(whole_number)]


def _known_currency(value: str) -> str:
    if value not in money.CURRENCIES:
        raise ValueError("must be a lowercase ISO 4217 currency code such as 'usd'")
    return value


Currency = Annotated[
    str,
    Field(
        min_length=3,
        max_length=3,
        description="Lowercase ISO 4217 code, e.g. usd",
        json_schema_extra={"enum": [*sorted(money.CURRENCIES)]},
    ),
    AfterValidator(_known_currency),
]


def _not_null(value: Any) -> Any:
    """For optional fields that may be left out but not sent as null."""
    if value is None:
        raise ValueError("leave the field out instead of sending null")
    return value


def _strip_null(schema: dict[str, Any], names: tuple[str, ...]) -> None:
    """Document `names` as optional but never null (what `_not_null` enforces)."""
    for name in names:
        prop = schema["properties"][name]
        options = [o for o in prop.pop("anyOf", []) if o.get("type") != "null"]
        if len(options) == 1:
            prop.update(options[0])
        prop.pop("default", None)


def _line_item_schema(schema: dict[str, Any]) -> None:
    _strip_null(schema, ("sku", "description", "unit_amount"))
    schema["oneOf"] = [
        {"required": ["sku"], "not": {"required": ["unit_amount"]}},
        {"required": ["description", "unit_amount"], "not": {"required": ["sku"]}},
    ]


class LineItem(ApiModel):
    """`{sku, quantity}` (priced from the catalog) or `{description, unit_amount, quantity}`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_line_item_schema)

    sku: str | None = Field(default=None, min_length=1, max_length=100, pattern=SKU_PATTERN)
    description: SafeText | None = Field(default=None, min_length=1, max_length=500)
    unit_amount: MinorUnits | None = None
    quantity: Quantity = 1

    _no_nulls = field_validator("sku", "description", "unit_amount", mode="before")(_not_null)

    @model_validator(mode="after")
    def _sku_or_custom(self) -> LineItem:
        if self.sku is not None and self.unit_amount is not None:
            raise ValueError("give either sku or unit_amount, not both")
        if self.sku is None and (self.unit_amount is None or self.description is None):
            raise ValueError("give sku, or description and unit_amount")
        return self


def _payment_create_schema(schema: dict[str, Any]) -> None:
    _strip_null(schema, ("amount", "line_items"))
    schema["oneOf"] = [
        {"required": ["amount"], "not": {"required": ["line_items"]}},
        {"required": ["line_items"], "not": {"required": ["amount"]}},
    ]
    # Currencies that step by more than one minor unit: three-decimal ones end in 0, ISK
    # amounts are multiples of 100.
    schema["allOf"] = [
        {
            "if": {
                "properties": {
                    "currency": {"enum": sorted(c for c, s in money.STEP.items() if s == step)}
                },
                "required": ["currency"],
            },
            "then": {"properties": {"amount": {"multipleOf": step}}},
        }
        for step in sorted(set(money.STEP.values()))
    ]


Metadata = Annotated[
    dict[str, str],
    WithJsonSchema(
        {
            "type": "object",
            "maxProperties": METADATA_MAX_KEYS,
            "propertyNames": {"minLength": 1, "maxLength": METADATA_KEY_MAX, "pattern": NO_NUL},
            "additionalProperties": {
                "type": "string",
                "maxLength": METADATA_VALUE_MAX,
                "pattern": NO_NUL,
            },
            "description": f"Up to {METADATA_MAX_KEYS} string pairs: keys of 1 to "
            f"{METADATA_KEY_MAX} characters, values of at most {METADATA_VALUE_MAX}.",
        }
    ),
]


class PaymentCreate(ApiModel):
    """A payment request. Give `amount` (minor units) or `line_items`, not both."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_payment_create_schema)

    # `currency` comes first so that the amount checks below can see it.
    currency: Currency
    amount: MinorUnits | None = Field(
        default=None,
        description="Minor units, e.g. 1999 = $19.99, 500 = ¥500; three-decimal currencies "
        "(bhd, jod, kwd, omr, tnd) end in 0; isk amounts are multiples of 100",
    )
    line_items: list[LineItem] | None = Field(default=None, min_length=1, max_length=100)
    payment_method: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_]+$")
    customer: str | None = Field(
        default=None,
        max_length=255,
        pattern=r"^cus_[A-Za-z0-9]+$",
        description="The provider's Customer the payment method belongs to (a saved card). "
        "Stripe requires it for a payment method attached to a Customer; one used without a "
        "Customer cannot be used again. A Customer belongs to the one agent an operator bound "
        "it to; naming one not bound to you is a 403 customer_not_allowed.",
    )
    capture_method: Literal["automatic", "manual"] = "automatic"
    description: SafeText | None = Field(default=None, max_length=1000)
    metadata: Metadata = Field(default_factory=dict)

    _no_nulls = field_validator("amount", "line_items", mode="before")(_not_null)

    @field_validator("amount")
    @classmethod
    def _amount(cls, value: int | None, info: ValidationInfo) -> int | None:
        currency = info.data.get("currency")
        if value is not None and currency is not None:
            problem = money.amount_problem(value, currency)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("line_items")
    @classmethod
    def _line_items(
        cls, value: list[LineItem] | None, info: ValidationInfo
    ) -> list[LineItem] | None:
        currency = info.data.get("currency")
        # Catalog (sku) lines are priced, and their total checked, by the pricing role; the
        # custom lines alone must already be chargeable.
        custom = [i for i in value or () if i.sku is None]
        if custom and currency is not None:
            total = sum((i.unit_amount or 0) * i.quantity for i in custom)
            problem = money.amount_problem(total, currency)
            if problem:
                raise ValueError(f"custom line items total: {problem}")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > METADATA_MAX_KEYS:
            raise ValueError(f"metadata has at most {METADATA_MAX_KEYS} keys")
        for key, item in value.items():
            if not key or len(key) > METADATA_KEY_MAX:
                raise ValueError(f"metadata keys are 1 to {METADATA_KEY_MAX} characters")
            if len(item) > METADATA_VALUE_MAX:
                raise ValueError(f"metadata values are at most {METADATA_VALUE_MAX} characters")
            if not storable(key) or not storable(item):
                raise ValueError("metadata must be valid Unicode without NUL characters")
        return value

    @model_validator(mode="after")
    def _amounts(self) -> PaymentCreate:
        if (self.amount is None) == (self.line_items is None):
            raise ValueError("give exactly one of amount or line_items")
        return self


class Failure(ApiModel):
    code: str
    message: str | None


# Every state of a payment (schema/migrations/0001_payments.sql: payment_states).
PaymentStatus = Literal[
    "received",
    "priced",
    "in_review",
    "approved",
    "charging",
    "requires_action",
    "authorized",
    "succeeded",
    "reconciled",
    "partially_refunded",
    "refunded",
    "rejected",
    "failed",
    "canceled",
]

# Where a payment stops for now: final, waiting for the agent (capture, authentication), or
# settled with the provider. A long-poll returns on these unless told otherwise.
SETTLED_STATES: frozenset[str] = frozenset(
    {
        "succeeded",
        "authorized",
        "requires_action",
        "reconciled",
        "partially_refunded",
        "refunded",
        "rejected",
        "failed",
        "canceled",
    }
)


# The only transitions between states (schema/migrations/0001_payments.sql:
# payment_transitions, which Postgres enforces; tests/test_api_listing.py checks that this
# copy is the same).
TRANSITIONS: frozenset[tuple[str, str]] = frozenset(
    {
        ("received", "priced"),
        ("received", "rejected"),
        ("received", "canceled"),
        ("priced", "approved"),
        ("priced", "in_review"),
        ("priced", "rejected"),
        ("priced", "canceled"),
        ("in_review", "approved"),
        ("in_review", "rejected"),
        ("in_review", "canceled"),
        ("approved", "charging"),
        ("approved", "canceled"),
        ("charging", "succeeded"),
        ("charging", "authorized"),
        ("charging", "requires_action"),
        ("charging", "failed"),
        ("charging", "canceled"),
        ("requires_action", "succeeded"),
        ("requires_action", "authorized"),
        ("requires_action", "failed"),
        ("requires_action", "canceled"),
        ("authorized", "succeeded"),
        ("authorized", "canceled"),
        ("authorized", "failed"),
        ("succeeded", "reconciled"),
        ("reconciled", "partially_refunded"),
        ("reconciled", "refunded"),
        ("partially_refunded", "refunded"),
    }
)


def passed_through(
    transitions: Collection[tuple[str, str]], start: str = "received"
) -> dict[str, frozenset[str]]:
    """For each state, the states a payment in it has certainly been in: itself and every
    state that each path from `start` to it goes through (its dominators)."""
    states = {start} | {state for pair in transitions for state in pair}

    def reachable(avoiding: str) -> set[str]:
        """The states a payment can reach from `start` without ever being in `avoiding`."""
        seen = set() if avoiding == start else {start}
        todo = list(seen)
        while todo:
            here = todo.pop()
            for before, after in transitions:
                if before == here and after != avoiding and after not in seen:
                    seen.add(after)
                    todo.append(after)
        return seen

    avoidable = {state: reachable(state) for state in states}
    return {
        state: frozenset(s for s in states if state not in avoidable[s] or s == state)
        for state in states
    }


# Computed once: `PASSED_THROUGH["refunded"]` holds `succeeded` and `reconciled`;
# `PASSED_THROUGH["succeeded"]` does not hold `authorized` (charging can succeed at once).
PASSED_THROUGH: dict[str, frozenset[str]] = passed_through(TRANSITIONS)


def wait_is_over(status: str, pending_action: str | None, wanted: Collection[str] | None) -> bool:
    """Whether a long-poll answers now (the server and the clients decide alike).

    With `wanted`: the payment is in one of those states or past it, i.e. in a state it can
    only reach through it (waiting for `succeeded` ends on `reconciled`, `partially_refunded`
    or `refunded` too; waiting for `authorized` ends on `authorized` alone, since a payment
    can succeed without being authorized first). By default: in a settled state with nothing
    asked for still pending."""
    if wanted:
        return not PASSED_THROUGH.get(status, frozenset({status})).isdisjoint(wanted)
    return status in SETTLED_STATES and pending_action is None


class Payment(ApiModel):
    id: str
    object: Literal["payment"] = "payment"
    agent_id: str
    status: PaymentStatus
    currency: str
    amount_subtotal: int | None
    amount_fee: int | None
    amount_tax: int | None
    amount_total: int | None
    amount_refunded: int
    # What the provider collected, set once the payment is `reconciled`: the total, or less
    # when only part of it was captured at the provider (the rest of the hold is released).
    amount_captured: int | None = None
    # What lost disputes took back (the customer's bank won a chargeback): the disputed
    # amount less what refunds had given the customer already; the agent's budget is not
    # given back. The payment's state does not change.
    amount_lost_to_disputes: int = 0
    capture_method: str
    payment_method: str
    customer: str | None = None
    provider_payment_id: str | None
    failure: Failure | None
    # What the fleet still does because it was asked: a capture, a cancel or a refund.
    pending_action: Literal["capture", "cancel", "refund"] | None = None
    description: str | None
    metadata: dict[str, str]
    breakdown: dict[str, Any] | None = None
    risk: dict[str, Any] | None = None
    created_at: datetime
    updated_at: datetime


class PaymentEvent(ApiModel):
    id: int
    type: str
    from_status: str | None
    to_status: str | None
    actor: str
    reason: str | None
    data: dict[str, Any]
    created_at: datetime


class EventList(ApiModel):
    object: Literal["list"] = "list"
    data: list[PaymentEvent]


class RefundFailure(ApiModel):
    code: str
    message: str | None = None


def _refund_create_schema(schema: dict[str, Any]) -> None:
    _strip_null(schema, ("amount",))


class RefundCreate(ApiModel):
    """A refund. Without `amount`, all that remains refundable (leave it out: a null amount
    is refused, not taken as "all")."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_refund_create_schema)

    amount: MinorUnits | None = Field(default=None, description="Minor units")
    reason: Literal["duplicate", "fraudulent", "requested_by_customer"] | None = None

    _no_nulls = field_validator("amount", mode="before")(_not_null)


class Refund(ApiModel):
    id: str
    object: Literal["refund"] = "refund"
    payment_id: str
    amount: int
    currency: str
    status: Literal["pending", "succeeded", "failed"]
    reason: str | None = None
    provider_refund_id: str | None = None
    failure: RefundFailure | None = None
    created_at: datetime
    updated_at: datetime


class RefundList(ApiModel):
    object: Literal["list"] = "list"
    data: list[Refund]


class PaymentList(ApiModel):
    """One page of payments, newest first; `has_more` says whether another page follows."""

    object: Literal["list"] = "list"
    data: list[Payment]
    has_more: bool
    url: str


class AgentInfo(ApiModel):
    id: str
    object: Literal["agent"] = "agent"
    name: str
    is_operator: bool
    key_prefixes: list[str] = Field(description="The first characters of its live keys")
    created_at: datetime
    revoked_at: datetime | None


class AgentList(ApiModel):
    object: Literal["list"] = "list"
    data: list[AgentInfo]


class ErrorDetail(ApiModel):
    type: str
    code: str
    message: str
    param: str | None


class ErrorResponse(ApiModel):
    error: ErrorDetail
