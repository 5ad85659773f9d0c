"""Every setting agentpay reads, in one pydantic-settings class.

Values come from the environment (names below) or defaults. The contract's variables are
`DATABASE_URL`, `STRIPE_API_KEY`, `STRIPE_API_BASE`, `STRIPE_WEBHOOK_SECRET` and
`AGENTPAY_DATA_DIR`; everything else is prefixed `AGENTPAY_`.
"""

from __future__ import annotations

import json
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tasks import money

ROLES = ("pricing", "risk", "charge", "reconcile")

# The key the sandbox accepts; real Stripe needs a real test-mode key in STRIPE_API_KEY.
SANDBOX_API_KEY = "sk_test_agentpay_sandbox"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTPAY_", extra="ignore")

    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "AGENTPAY_DATABASE_URL")
    )
    stripe_api_key: str = Field(
        default=SANDBOX_API_KEY,
        validation_alias=AliasChoices("STRIPE_API_KEY", "AGENTPAY_STRIPE_API_KEY"),
    )
    stripe_api_base: str | None = Field(
        default=None, validation_alias=AliasChoices("STRIPE_API_BASE", "AGENTPAY_STRIPE_API_BASE")
    )
    stripe_webhook_secret: str | None = Field(
        default=None,
        validation_alias=AliasChoices("STRIPE_WEBHOOK_SECRET", "AGENTPAY_STRIPE_WEBHOOK_SECRET"),
    )
    data_dir: Path = Field(
        default=Path(".data"), validation_alias=AliasChoices("AGENTPAY_DATA_DIR", "DATA_DIR")
    )

    # Database pools (per process): connections kept open, and the most it opens.
    pool_min_size: int = 2
    pool_max_size: int = 10

    # API processes `agentpay api` starts on its port (one Python process uses one core).
    api_processes: int = Field(default=1, ge=1)

    # Workers: jobs one process runs at once, per role.
    pricing_concurrency: int = 10
    risk_concurrency: int = 10
    charge_concurrency: int = 10
    reconcile_concurrency: int = 10
    # Seconds a stopping worker waits for its running jobs before aborting them.
    shutdown_grace_seconds: float = 20.0
    # Fallback poll when no LISTEN/NOTIFY wake-up arrives.
    poll_interval_seconds: float = 2.0
    # How often a worker process marks itself alive (procrastinate's heartbeat).
    heartbeat_seconds: float = 5.0
    # A job whose worker has not heartbeat for this long is retried. procrastinate stops
    # heartbeating while a worker drains on shutdown, so this must stay above
    # heartbeat + shutdown grace (checked below).
    stalled_after_seconds: float = 45.0
    # A stalled worker's row (its jobs are rescued at once) is kept this long after its last
    # heartbeat, so that `agentpay_workers{state="stalled"}` and `agentpay status` show the
    # crash for long enough to alert on; then maintenance deletes it.
    stalled_worker_retention_seconds: float = Field(default=900.0, gt=0)
    # A payment with no job for it that has not moved for this long is driven on again.
    sweep_after_seconds: float = 120.0
    # A payment waiting on a person (authorized, requires_action) can still be moved on by the
    # provider alone (3-D Secure completed, an authorization expired); if no webhook told us,
    # reconcile looks at the provider after this long, and again each time this long passes.
    recheck_waiting_after_seconds: float = 900.0
    # A payment whose customer has not completed 3-D Secure (requires_action) for this long
    # is canceled, its budget hold released: the provider would keep it open for good.
    requires_action_expire_seconds: float = Field(default=86400.0, gt=0)
    # How often the maintenance round runs (rescue of stalled jobs, the sweep of stuck
    # payments, pruning: workers/maintenance.py), in the one worker process holding its lock.
    maintenance_interval_seconds: float = 5.0
    # Operations (workers/maintenance.py, workers/status.py, docs/operations.md).
    # Finished procrastinate jobs are deleted this long after they finished (the history
    # stays in payment_events): succeeded/cancelled/aborted ones, and failed ones (kept
    # longer for operators). At most `prune_batch_size` per round, every
    # `prune_interval_seconds` — or, while batches come back full (a backlog), every
    # maintenance round until it is gone. Windows of the ops views (1 h of failures, 15 min of
    # throughput) need the jobs they count: the floors below keep them.
    prune_succeeded_after_seconds: float = Field(default=3600.0, ge=900.0)
    prune_failed_after_seconds: float = Field(default=7 * 86400.0, ge=3600.0)
    prune_interval_seconds: float = Field(default=60.0, gt=0)
    prune_batch_size: int = Field(default=5000, ge=1)
    # Provider webhook events are deleted this long after they arrived, on the same schedule.
    # A redelivery must find its stored copy, to be answered as a duplicate (a second copy of
    # a dispute event would record the dispute twice): Stripe redelivers for up to 3 days by
    # itself and keeps events, which an operator can resend, for 30 — hence the floor.
    webhook_retention_days: float = Field(default=30.0, ge=30.0)
    # Events no webhook delivered (refunds and disputes: what changes a settled payment) are
    # listed from the provider this often and taken in (tasks/catchup.py); 0 turns it off.
    # Each listing starts this long before the last one's start (clocks differ; an event is
    # listed a moment after it is made).
    event_catch_up_interval_seconds: float = Field(default=300.0, ge=0)
    event_catch_up_overlap_seconds: float = Field(default=600.0, ge=0)
    # A payment that has not moved for this long shows in ops_stuck_payments.
    stuck_after_seconds: float = Field(default=300.0, gt=0)
    # A worker process serves its own Prometheus metrics (job durations, provider calls) on
    # this port when set (0 or unset: not served).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    # The address a worker serves them on: loopback unless set (`0.0.0.0` for a scraper on
    # another host); they are served without authentication.
    metrics_host: str = "127.0.0.1"
    # The API's /metrics: when a token is set, a scrape must send `Authorization: Bearer
    # <token>` (it shows the whole platform's volume, which agents on the same port should not
    # read). Scrapes within `metrics_cache_seconds` of each other share one read of the views,
    # so no rate of requests costs the database more than one read per that time.
    metrics_token: str | None = None
    metrics_cache_seconds: float = Field(default=5.0, ge=0)

    # Provider calls.
    provider_timeout_seconds: float = 10.0
    provider_max_network_retries: int = 2
    # Seconds before reconcile looks again at a PaymentIntent that is not settled yet
    # (processing, or not confirmed), or hands it back to the charge role.
    provider_recheck_seconds: float = 5.0
    # Webhook signatures older than this are refused (Stripe's default tolerance).
    webhook_tolerance_seconds: int = Field(default=300, ge=1)
    # Tests only: the charge task SIGKILLs its own process right after the provider answered
    # and before the outcome is committed, to prove a crash there charges once. Refused with
    # any STRIPE_API_KEY but the sandbox's.
    debug_crash_after_provider_call: bool = False

    # Pricing (tasks/pricing.py). Tax is charged on the subtotal (per total, not per line);
    # the platform fee is a percentage of the subtotal plus a fixed amount per currency
    # (minor units; currencies not listed have no fixed part). Each is rounded once,
    # half to even, to the currency's minor units. Defaults: no tax, no fee.
    tax_rate: Decimal = Field(default=Decimal("0"), ge=0, le=1)
    fee_percent: Decimal = Field(default=Decimal("0"), ge=0, le=100)
    fee_fixed: dict[str, int] = Field(default_factory=dict)
    # The provider's smallest charge per currency (minor units): a total below it is refused
    # at the POST (a fixed amount) or rejected by pricing (`amount_invalid`), where Stripe
    # would fail it as `amount_too_small`. Defaults: Stripe's published minimums, which hold
    # where the account settles in that currency (otherwise Stripe converts, and may still
    # refuse a little more); currencies not listed have none here. `{}` turns it off.
    min_charge_amount: dict[str, int] = Field(default_factory=lambda: dict(money.STRIPE_MIN_CHARGE))

    # Risk (tasks/risk.py). Amount limits in minor units per currency; "default" applies to
    # currencies not listed. Above the review threshold a payment waits in_review for an
    # operator; above the hard limit it is rejected.
    risk_review_above: dict[str, int] = Field(
        default_factory=lambda: {"default": 100_000, "jpy": 150_000, "krw": 1_500_000}
    )
    risk_reject_above: dict[str, int] = Field(
        default_factory=lambda: {"default": 1_000_000, "jpy": 1_500_000, "krw": 15_000_000}
    )
    # Velocity: per agent, within a sliding window, at most this many payments (any currency)
    # and this much money per currency (minor units; "default" for the unlisted).
    risk_velocity_window_seconds: float = 60.0
    risk_velocity_max_count: int = 600
    risk_velocity_max_amount: dict[str, int] = Field(
        default_factory=lambda: {"default": 10_000_000, "jpy": 15_000_000, "krw": 150_000_000}
    )
    # Agents (ids or names) and payment methods whose payments are always rejected.
    risk_blocked_agents: list[str] = Field(default_factory=list)
    risk_blocked_payment_methods: list[str] = Field(default_factory=list)
    # May an agent with no budget (never created with one, never funded) spend at all?
    allow_unbudgeted_spending: bool = True
    # Who binds a provider Customer (`cus_…`) to the one agent whose payments may name it
    # (tasks/customers.py): "operator" (`agentpay customers bind`; a payment naming an
    # unbound Customer is refused), or "first_use": the first agent whose payment names it,
    # for fleets whose agents all act for one owner (any agent that learns an id first gets
    # that saved card).
    customer_binding: Literal["operator", "first_use"] = "operator"

    # The agent-facing API (api/, docs/api.md).
    # Request bodies above this many bytes are refused with 413 before they are parsed
    # (provider webhooks, under /v1/webhooks/, may be up to `webhook_max_body_bytes`).
    api_max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    webhook_max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # JSON bodies nested deeper than this (objects and arrays) are refused with 400.
    api_max_json_depth: int = Field(default=16, ge=4)
    # Per-agent token bucket, shared by every API process (kept in Postgres): requests a
    # second it refills, and the burst it holds. 0 turns rate limiting off.
    api_rate_limit_per_second: float = Field(default=100.0, ge=0)
    api_rate_limit_burst: int = Field(default=200, ge=1)
    # Per client address, in each API process's memory: how many requests with a key that is
    # no live key it may send a second, and in a burst; past them, every request from that
    # address is a 429 until its bucket refills, without a database lookup (a flood of
    # guessed keys would otherwise cost a lookup each, and hold the pool). 0: no limit.
    api_invalid_keys_per_second: float = Field(default=5.0, ge=0)
    api_invalid_keys_burst: int = Field(default=50, ge=1)
    # Idempotency keys and their stored responses are kept at least this long (Stripe: 24 h),
    # then pruned by the API process every `idempotency_prune_interval_seconds`.
    idempotency_retention_hours: float = Field(default=24.0, ge=24.0)
    idempotency_prune_interval_seconds: float = Field(default=600.0, gt=0)
    # Long-poll (GET /v1/payments/{id}/wait): the longest a wait lasts (a request may ask for
    # up to 60 s; a lower setting cuts longer waits short), and how often a waiter re-reads
    # the payment even without a notification (a safety net).
    long_poll_max_seconds: float = Field(default=60.0, gt=0)
    long_poll_recheck_seconds: float = Field(default=5.0, gt=0)
    # The most waits one agent may hold open at once in one API process (more is a 429):
    # each is cheap, but a change wakes all of a payment's waiters into the pool at once.
    long_poll_max_per_agent: int = Field(default=200, ge=1)

    @model_validator(mode="after")
    def _stalled_after_shutdown_window(self) -> Settings:
        floor = self.heartbeat_seconds + self.shutdown_grace_seconds
        if self.stalled_after_seconds <= floor:
            raise ValueError(
                f"AGENTPAY_STALLED_AFTER_SECONDS ({self.stalled_after_seconds}) must exceed "
                f"heartbeat + shutdown grace ({floor}): a draining worker stops heartbeating"
            )
        return self

    @model_validator(mode="after")
    def _amounts_per_currency(self) -> Settings:
        # A key that is no currency (`"USD"`, a typo) would be ignored without a word — the
        # fee not charged, a limit not applied — and a fixed fee that is negative or off the
        # currency's step would strand every payment in that currency at pricing.
        per_currency = {
            "AGENTPAY_FEE_FIXED": self.fee_fixed,
            "AGENTPAY_MIN_CHARGE_AMOUNT": self.min_charge_amount,
            "AGENTPAY_RISK_REVIEW_ABOVE": self.risk_review_above,
            "AGENTPAY_RISK_REJECT_ABOVE": self.risk_reject_above,
            "AGENTPAY_RISK_VELOCITY_MAX_AMOUNT": self.risk_velocity_max_amount,
        }
        for name, amounts in per_currency.items():
            fee = name in ("AGENTPAY_FEE_FIXED", "AGENTPAY_MIN_CHARGE_AMOUNT")
            for currency, amount in amounts.items():
                if currency not in money.CURRENCIES and (fee or currency != "default"):
                    raise ValueError(
                        f"{name}: {currency!r} is not a lowercase ISO 4217 code"
                        + ("" if fee else ' or "default"')
                    )
                if amount < 0:
                    raise ValueError(f"{name}: {currency} {amount} is below 0")
                if fee and amount % money.granularity(currency):
                    raise ValueError(
                        f"{name}: {currency} {amount} must be a multiple of "
                        f"{money.granularity(currency)} minor units"
                    )
        return self

    @model_validator(mode="after")
    def _api_base_without_version(self) -> Settings:
        # The SDK adds `/v1/…` to the base itself: a base ending in `/v1` makes every call
        # `/v1/v1/…`, which Stripe answers 404 "Unrecognized request URL".
        base = (self.stripe_api_base or "").rstrip("/")
        if base.lower().endswith("/v1"):
            raise ValueError(
                f"STRIPE_API_BASE ({self.stripe_api_base}) must not end in /v1: the SDK adds "
                f"the API version to every path itself; set it to {base[:-3] or '/'}"
            )
        return self

    @model_validator(mode="after")
    def _debug_crash_on_the_sandbox_only(self) -> Settings:
        if self.debug_crash_after_provider_call and self.stripe_api_key != SANDBOX_API_KEY:
            raise ValueError(
                "AGENTPAY_DEBUG_CRASH_AFTER_PROVIDER_CALL is for tests against the sandbox "
                "provider only: with a real STRIPE_API_KEY every charge worker would kill "
                "itself after each provider call"
            )
        return self

    def concurrency(self, role: str) -> int:
        value: int = getattr(self, f"{role}_concurrency")
        return value

    @property
    def stack_file(self) -> Path:
        return self.data_dir / "stack.json"

    def read_stack(self) -> dict[str, str]:
        """What `agentpay dev` wrote about the running stack, or {} if it is not running."""
        try:
            stack: dict[str, str] = json.loads(self.stack_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return stack

    def resolved_database_url(self) -> str:
        """`DATABASE_URL`, else the database of the dev stack running in the data dir."""
        if self.database_url:
            return self.database_url
        url = self.read_stack().get("database_url")
        if url:
            return url
        raise NoDatabase(
            "No database: set DATABASE_URL, or start the dev stack (`agentpay dev`) "
            f"so that {self.stack_file} exists (another data dir: --data-dir or "
            "AGENTPAY_DATA_DIR)."
        )


class NoDatabase(RuntimeError):
    """No database is configured: no DATABASE_URL, and no dev stack in the data dir."""


@lru_cache
def get_settings() -> Settings:
    return Settings()
