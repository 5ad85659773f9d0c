-- Which agent may charge a provider Customer's saved payment methods. Every agent charges
-- through the same provider account, where a Customer (`cus_…`) is visible to all of them:
-- without an owner, an agent that learned another's Customer id could charge that saved card.
-- A Customer is bound to one agent — by an operator (`agentpay customers bind`), or, unless
-- AGENTPAY_CUSTOMER_BINDING is `operator`, to the first agent that names it in a payment —
-- and another agent's payment naming it is refused (tasks/customers.py).
CREATE TABLE customer_owners (
    customer  text PRIMARY KEY CHECK (customer ~ '^cus_[A-Za-z0-9]+$'),
    agent_id  text NOT NULL REFERENCES agents (id),
    bound_at  timestamptz NOT NULL DEFAULT now(),
    bound_by  text NOT NULL  -- `agent:<id>` (its first payment naming it) or `operator:<name>`
);
CREATE INDEX customer_owners_agent_idx ON customer_owners (agent_id, customer);

-- The Customers payments named before: each bound to the agent whose payment named it first
-- (a Customer several agents named is listed by `agentpay customers list --shared`, to be
-- bound to the right one by hand).
INSERT INTO customer_owners (customer, agent_id, bound_at, bound_by)
SELECT DISTINCT ON (customer) customer, agent_id, created_at, 'agent:' || agent_id
  FROM payment_jobs
 WHERE customer IS NOT NULL
 ORDER BY customer, created_at, id;
