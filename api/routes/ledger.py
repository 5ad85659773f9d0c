"""Budgets: agents read their balance and statement; operators fund agents' budgets."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response
from pydantic import ConfigDict, Field

from api.deps import AgentDep, OperatorDep, PoolDep
from api.errors import ApiError, not_found, responses
from api.idempotency import IdempotencyDep
from api.models import ApiModel, Currency, MinorUnits, SafeText
from tasks import agents, ledger, money

router = APIRouter(tags=["ledger"])

ERRORS = responses(
    400, 401, 403, 404, 413, 429, 500, described={403: "Not allowed", 404: "No such agent"}
)
DEPOSIT_ERRORS = responses(
    400, 401, 403, 404, 409, 413, 429, 500, described={403: "Not allowed", 404: "No such agent"}
)


class Amount(ApiModel):
    amount: int
    currency: str


class Balance(ApiModel):
    object: Literal["balance"] = "balance"
    agent_id: str
    budgeted: bool = Field(description="Held to a budget (created with one, or funded)")
    unlimited: bool = Field(description="May spend without a budget")
    available: list[Amount]
    held: list[Amount] = Field(description="Reserved for payments in flight")


class BalanceTransaction(ApiModel):
    object: Literal["balance_transaction"] = "balance_transaction"
    id: int
    transaction_id: str
    type: str
    account: str
    amount: int
    currency: str
    balance_after: int
    payment_id: str | None
    description: str | None
    actor: str
    created_at: datetime


class BalanceTransactionList(ApiModel):
    object: Literal["list"] = "list"
    data: list[BalanceTransaction]
    has_more: bool


class DepositCreate(ApiModel):
    model_config = ConfigDict(extra="forbid")

    amount: MinorUnits = Field(description="Minor units, e.g. 5000 = $50.00")
    currency: Currency
    description: SafeText | None = Field(default=None, max_length=500)


class Deposit(ApiModel):
    object: Literal["deposit"] = "deposit"
    id: str | None
    agent_id: str
    amount: int
    currency: str
    balance: int


async def _whose(agent: agents.Agent, agent_id: str | None, pool: Any) -> str:
    """Agents read their own balance; operators may name another agent."""
    if agent_id is None or agent_id == agent.id:
        return agent.id
    if not agent.is_operator:
        raise ApiError(
            403,
            "operator_only",
            "Only operators read another agent's balance",
            type_="permission_error",
            param="agent_id",
        )
    async with pool.connection() as conn:
        found = await agents.find(conn, agent_id)
    if found is None:
        raise not_found("agent", param="agent_id")
    return str(found["id"])


@router.get("/v1/balance", response_model=Balance, responses=ERRORS)
async def get_balance(
    agent: AgentDep, pool: PoolDep, agent_id: str | None = None
) -> dict[str, Any]:
    """The caller's budget per currency: available, and held for payments in flight."""
    whose = await _whose(agent, agent_id, pool)
    async with pool.connection() as conn:
        return await ledger.balance(conn, whose)


@router.get("/v1/balance/transactions", response_model=BalanceTransactionList, responses=ERRORS)
async def list_balance_transactions(
    agent: AgentDep,
    pool: PoolDep,
    agent_id: str | None = None,
    limit: int = Query(default=50, ge=1, le=500),
    starting_after: int | None = Query(
        default=None, ge=1, le=2**63 - 1, description="An entry id: older ones"
    ),
) -> dict[str, Any]:
    """The caller's statement: every entry on its budget and holds, newest first."""
    whose = await _whose(agent, agent_id, pool)
    async with pool.connection() as conn:
        rows = await ledger.statement(conn, whose, limit=limit + 1, starting_after=starting_after)
    return {"object": "list", "data": rows[:limit], "has_more": len(rows) > limit}


@router.post(
    "/v1/agents/{agent_id}/deposits",
    status_code=201,
    response_model=Deposit,
    responses=DEPOSIT_ERRORS,
)
async def create_deposit(
    agent_id: str, body: DepositCreate, operator: OperatorDep, idem: IdempotencyDep
) -> Response:
    """Fund an agent's budget (operators only). From then on the agent is held to its
    budget. The deposit is one transaction."""
    problem = money.amount_problem(body.amount, body.currency)
    if problem:
        raise ApiError(400, "parameter_invalid", f"amount: {problem}", param="amount")
    async with idem.transaction() as conn:
        found = await agents.find(conn, agent_id)
        if found is None or found["id"] != agent_id:
            raise not_found("agent")
        deposit = await ledger.deposit(
            conn,
            agent_id,
            body.amount,
            body.currency,
            actor=operator.actor,
            description=body.description,
        )
        return await idem.respond(Deposit.model_validate(deposit), 201)
