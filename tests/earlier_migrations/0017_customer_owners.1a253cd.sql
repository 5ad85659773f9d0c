-- Which agent may charge a provider Customer's saved payment methods. Every agent charges
-- through the same provider account, where a Customer (`cus_…`) is visible to all of them:
-- without an owner, an agent that learned another's Customer id could charge that saved card.
-- A Customer is bound to one agent by an operator (`agentpay customers bind`), or, with
-- AGENTPAY_CUSTOMER_BINDING=first_use, to the first agent that names it in a payment; another
-- agent's payment naming it is refused (tasks/customers.py).
CREATE TABLE customer_owners (
    customer  text PRIMARY KEY CHECK (customer ~ '^cus_[A-Za-z0-9]+$'),
    agent_id  text NOT NULL REFERENCES agents (id),
    bound_at  timestamptz NOT NULL DEFAULT now(),
    bound_by  text NOT NULL  -- `operator:<name>`, `agent:<id>` (first use) or `migration`
);
CREATE INDEX customer_owners_agent_idx ON customer_owners (agent_id, customer);

-- Every change of a Customer's owner, for good: bound, moved (`previous_agent_id` set) or
-- unbound (`agent_id` NULL), by whom and when.
CREATE TABLE customer_owner_changes (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer          text NOT NULL,
    agent_id          text REFERENCES agents (id),
    previous_agent_id text REFERENCES agents (id),
    actor             text NOT NULL,
    at                timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX customer_owner_changes_customer_idx ON customer_owner_changes (customer, id);

-- The Customers payments named before: each bound to the live, non-operator agent whose
-- payment named it first (operators' payments may name any Customer, and bind none). One that
-- several agents named is listed by `agentpay customers list --shared`, to be bound to the
-- right one by hand; one only operators or revoked agents named stays unbound.
WITH firsts AS (
    SELECT DISTINCT ON (p.customer) p.customer, p.agent_id
      FROM payment_jobs p JOIN agents a ON a.id = p.agent_id
     WHERE p.customer IS NOT NULL AND NOT a.is_operator AND a.revoked_at IS NULL
     ORDER BY p.customer, p.created_at, p.id
), bound AS (
    INSERT INTO customer_owners (customer, agent_id, bound_by)
    SELECT customer, agent_id, 'migration' FROM firsts
    RETURNING customer, agent_id
)
INSERT INTO customer_owner_changes (customer, agent_id, actor)
SELECT customer, agent_id, 'migration' FROM bound;
