"""Who may charge a provider Customer's saved payment methods (`customer_owners`, 0017).

Every agent charges through one provider account, where any Customer (`cus_…`) can be named
by anyone who knows its id, and agentpay makes none itself: they come from wherever the
cards were saved. So each Customer belongs to one agent, and a payment of another agent
naming it is refused before anything is recorded. With `AGENTPAY_CUSTOMER_BINDING=operator`
(the default) an operator binds it (`agentpay customers bind`), and a Customer bound to no
agent may be named by none; with `first_use` the first agent whose payment names it gets it
— for a fleet whose agents all act for the same owner, since any agent that learns an id
first takes that card. Operators' own payments may name any Customer. Every change of owner
is recorded in the operator audit (tasks/audit.py: `customer.bind`, `customer.unbind`)."""

from __future__ import annotations

from typing import Any, Literal

from tasks import audit
from tasks.db import Conn

Binding = Literal["first_use", "operator"]


async def owner(conn: Conn, customer: str) -> str | None:
    """The id of the agent the Customer is bound to, or None."""
    bound = await binding(conn, customer)
    return bound["agent_id"] if bound else None


async def binding(conn: Conn, customer: str) -> dict[str, Any] | None:
    """The Customer's binding (agent_id, bound_by, bound_at: `migration` for one 0017 made),
    or None."""
    cur = await conn.execute(
        "SELECT agent_id, bound_by, bound_at FROM customer_owners WHERE customer = %s",
        (customer,),
    )
    return await cur.fetchone()


async def may_use(conn: Conn, customer: str, agent_id: str, binding: Binding) -> bool:
    """May this agent's payment name the Customer? With `first_use`, an unbound Customer is
    bound to the agent here, in the caller's transaction (so it stays unbound if that rolls
    back); of two agents naming it at once, the second waits for the first's transaction and
    is refused if it committed."""
    if binding == "first_use":
        cur = await conn.execute(
            """INSERT INTO customer_owners (customer, agent_id, bound_by)
               VALUES (%(c)s, %(a)s, 'agent:' || %(a)s)
               ON CONFLICT (customer) DO NOTHING RETURNING bound_by""",
            {"c": customer, "a": agent_id},
        )
        row = await cur.fetchone()
        if row is not None:
            await _record(conn, customer, agent_id, None, row["bound_by"])
            return True
    # Read in a statement of its own: its snapshot sees a binding that the INSERT above
    # waited for, which the INSERT's own snapshot would not.
    return await owner(conn, customer) == agent_id


async def bind(conn: Conn, customer: str, agent_id: str, *, actor: str) -> str | None:
    """Bind the Customer to the agent (moving it from any other), in the caller's
    transaction; returns the agent it was bound to before, if another. Of two binds at once
    the second waits for the first and moves it from the first's agent."""
    cur = await conn.execute(
        """INSERT INTO customer_owners (customer, agent_id, bound_by) VALUES (%s, %s, %s)
           ON CONFLICT (customer) DO NOTHING RETURNING agent_id""",
        (customer, agent_id, actor),
    )
    if await cur.fetchone() is not None:
        await _record(conn, customer, agent_id, None, actor)
        return None
    # Bound already (or by a transaction that committed while the INSERT waited): a statement
    # of its own sees it, and locks it.
    cur = await conn.execute(
        "SELECT agent_id FROM customer_owners WHERE customer = %s FOR UPDATE", (customer,)
    )
    before = await cur.fetchone()
    previous = before["agent_id"] if before else None
    if previous == agent_id:
        return None
    await conn.execute(
        """INSERT INTO customer_owners (customer, agent_id, bound_by) VALUES (%s, %s, %s)
           ON CONFLICT (customer) DO UPDATE
              SET agent_id = EXCLUDED.agent_id, bound_by = EXCLUDED.bound_by, bound_at = now()""",
        (customer, agent_id, actor),
    )
    await _record(conn, customer, agent_id, previous, actor)
    return previous


async def unbind(conn: Conn, customer: str, *, actor: str) -> str | None:
    """Take the Customer from its agent; returns that agent's id, None if it was unbound."""
    cur = await conn.execute(
        "DELETE FROM customer_owners WHERE customer = %s RETURNING agent_id", (customer,)
    )
    row = await cur.fetchone()
    if row is None:
        return None
    await _record(conn, customer, None, row["agent_id"], actor)
    return str(row["agent_id"])


async def _record(
    conn: Conn, customer: str, agent_id: str | None, previous: str | None, actor: str
) -> None:
    action = "customer.bind" if agent_id else "customer.unbind"
    data = {"agent_id": agent_id, "previous_agent_id": previous}
    await audit.record(conn, action, customer, data, actor=actor)


async def changes(conn: Conn, customer: str) -> list[dict[str, Any]]:
    """Every change of the Customer's owner since 0019, oldest first (`agent_id` None: it
    was unbound)."""
    cur = await conn.execute(
        """SELECT data->>'agent_id' AS agent_id, data->>'previous_agent_id' AS previous_agent_id,
                  actor, at
             FROM operator_audit
            WHERE subject = %s AND action IN ('customer.bind', 'customer.unbind')
            ORDER BY id""",
        (customer,),
    )
    return await cur.fetchall()


async def list_all(conn: Conn, *, agent_id: str | None = None) -> list[dict[str, Any]]:
    """Bound Customers (of one agent, with `agent_id`) with their agents."""
    cur = await conn.execute(
        """SELECT o.customer, o.agent_id, a.name AS agent_name, o.bound_by, o.bound_at
             FROM customer_owners o JOIN agents a ON a.id = o.agent_id
            WHERE %(agent)s::text IS NULL OR o.agent_id = %(agent)s
            ORDER BY o.customer""",
        {"agent": agent_id},
    )
    return await cur.fetchall()


async def shared(conn: Conn) -> list[dict[str, Any]]:
    """Customers that payments of an agent other than their owner named (before 0017 bound
    them, or before an operator moved them), or that no agent owns: one row per Customer with
    its owner (None) and the other agents. Reads every payment that names a Customer."""
    cur = await conn.execute(
        """SELECT p.customer, o.agent_id,
                  array_agg(DISTINCT p.agent_id ORDER BY p.agent_id) AS others
             FROM payment_jobs p LEFT JOIN customer_owners o ON o.customer = p.customer
            WHERE p.customer IS NOT NULL AND p.agent_id IS DISTINCT FROM o.agent_id
            GROUP BY p.customer, o.agent_id
            ORDER BY p.customer"""
    )
    return await cur.fetchall()
