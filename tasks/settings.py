"""Every setting agentpay reads, in one pydantic-settings class.

Values come from the environment (names below) or defaults. The contract's variables are
`DATABASE_URL`, `STRIPE_API_KEY`, `STRIPE_API_BASE`, `STRIPE_WEBHOOK_SECRET` and
`AGENTPAY_DATA_DIR`; everything else is prefixed `AGENTPAY_`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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

    # Database pools (per process).
    pool_min_size: int = 2
    pool_max_size: int = 10

    # Workers: jobs one process runs at once, per role.
    pricing_concurrency: int = 10
    risk_concurrency: int = 10
    charge_concurrency: int = 10
    reconcile_concurrency: int = 10
    # Seconds a stopping worker waits for its running jobs before aborting them.
    shutdown_grace_seconds: float = 20.0
    # Fallback poll when no LISTEN/NOTIFY wake-up arrives.
    poll_interval_seconds: float = 2.0
    heartbeat_seconds: float = 5.0
    # A job whose worker has not heartbeat for this long is retried. procrastinate stops
    # heartbeating while a worker drains on shutdown, so this must stay above
    # heartbeat + shutdown grace (checked below).
    stalled_after_seconds: float = 45.0
    # A payment with no job for it that has not moved for this long is driven on again.
    sweep_after_seconds: float = 120.0
    maintenance_interval_seconds: float = 5.0

    # Provider calls.
    provider_timeout_seconds: float = 10.0
    provider_max_network_retries: int = 2

    @model_validator(mode="after")
    def _stalled_after_shutdown_window(self) -> Settings:
        floor = self.heartbeat_seconds + self.shutdown_grace_seconds
        if self.stalled_after_seconds <= floor:
            raise ValueError(
                f"AGENTPAY_STALLED_AFTER_SECONDS ({self.stalled_after_seconds}) must exceed "
                f"heartbeat + shutdown grace ({floor}): a draining worker stops heartbeating"
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
        raise RuntimeError(
            "No database: set DATABASE_URL, or start the dev stack (`agentpay dev`) "
            f"so that {self.stack_file} exists."
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()
