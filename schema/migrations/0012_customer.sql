-- The provider's Customer a payment's payment method belongs to (Stripe's `cus_…`), when the
-- agent names one: Stripe refuses a payment method attached to a Customer without it, and a
-- payment method used without a Customer cannot be used again. NULL: none named.
-- Adding a nullable column without a default rewrites nothing and scans nothing.

ALTER TABLE payment_jobs ADD COLUMN customer text;
