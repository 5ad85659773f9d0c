"""The HTTP service: records and enqueues; never talks to the payment provider."""
