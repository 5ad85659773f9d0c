"""Fault injection for ``/v1`` requests: 500s, delays and lost responses.

One configuration is active at a time (``POST /_sandbox/faults`` replaces it). Each matching
request draws one number from the configuration's RNG (seeded with ``seed``): below
``error_rate`` it fails, below ``error_rate + lose_response_rate`` its response is lost.
``error_saved`` makes an error one that happened after the endpoint began, as Stripe's
rare 500s do: it is saved under the request's idempotency key and replayed to every retry
with that key — without effect, or with ``error_after_effect`` after the request took full
effect (its result is lost, the 500 kept in its place). ``delay_ms`` delays every matching
request. With ``count`` the configuration applies to the next ``count`` matching requests
only and then clears itself, which makes tests deterministic.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["FaultConfig", "FaultDecision", "FaultInjector"]

LoseAs = Literal["disconnect", "500"]


def _rate(data: Mapping[str, Any], name: str) -> float:
    value = data.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number between 0 and 1")
    return float(value)


def _opt_int(data: Mapping[str, Any], name: str, minimum: int) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}")
    return value


def _opt_strings(data: Mapping[str, Any], name: str) -> tuple[str, ...] | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings")
    return tuple(value)


@dataclass(frozen=True)
class FaultConfig:
    error_rate: float = 0.0
    error_should_retry: bool | None = None
    error_saved: bool = False
    error_after_effect: bool = False
    delay_ms: int = 0
    lose_response_rate: float = 0.0
    lose_response_as: LoseAs = "disconnect"
    paths: tuple[str, ...] | None = None
    methods: tuple[str, ...] | None = None
    count: int | None = None
    seed: int | None = None

    _FIELDS = frozenset(
        {
            "error_rate",
            "error_should_retry",
            "error_saved",
            "error_after_effect",
            "delay_ms",
            "lose_response_rate",
            "lose_response_as",
            "paths",
            "methods",
            "count",
            "seed",
        }
    )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FaultConfig:
        """Validate a control-API body; raises ValueError with a readable message."""
        unknown = set(data) - cls._FIELDS
        if unknown:
            raise ValueError(f"unknown fault settings: {', '.join(sorted(unknown))}")
        error_rate = _rate(data, "error_rate")
        lose_rate = _rate(data, "lose_response_rate")
        if error_rate + lose_rate > 1:
            raise ValueError("error_rate + lose_response_rate must not exceed 1")
        should_retry = data.get("error_should_retry")
        if should_retry is not None and not isinstance(should_retry, bool):
            raise ValueError("error_should_retry must be true, false or null")
        saved = data.get("error_saved", False)
        after_effect = data.get("error_after_effect", False)
        if not isinstance(saved, bool) or not isinstance(after_effect, bool):
            raise ValueError("error_saved and error_after_effect must be true or false")
        if after_effect and not saved:
            raise ValueError("error_after_effect needs error_saved")
        lose_as = data.get("lose_response_as", "disconnect")
        if lose_as not in ("disconnect", "500"):
            raise ValueError('lose_response_as must be "disconnect" or "500"')
        methods = _opt_strings(data, "methods")
        return cls(
            error_rate=error_rate,
            error_should_retry=should_retry,
            error_saved=saved,
            error_after_effect=after_effect,
            delay_ms=_opt_int(data, "delay_ms", 0) or 0,
            lose_response_rate=lose_rate,
            lose_response_as=lose_as,
            paths=_opt_strings(data, "paths"),
            methods=tuple(m.upper() for m in methods) if methods is not None else None,
            count=_opt_int(data, "count", 1),
            seed=_opt_int(data, "seed", -(2**63)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "error_rate": self.error_rate,
            "error_should_retry": self.error_should_retry,
            "error_saved": self.error_saved,
            "error_after_effect": self.error_after_effect,
            "delay_ms": self.delay_ms,
            "lose_response_rate": self.lose_response_rate,
            "lose_response_as": self.lose_response_as,
            "paths": list(self.paths) if self.paths is not None else None,
            "methods": list(self.methods) if self.methods is not None else None,
            "count": self.count,
            "seed": self.seed,
        }

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method.upper() not in self.methods:
            return False
        return self.paths is None or any(path.startswith(p) for p in self.paths)


@dataclass(frozen=True)
class FaultDecision:
    error: bool = False
    should_retry: bool | None = None
    error_saved: bool = False
    error_after_effect: bool = False
    lose_response: bool = False
    lose_as: LoseAs = "disconnect"
    delay_ms: int = 0


NO_FAULT = FaultDecision()


class FaultInjector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._config: FaultConfig | None = None
        self._remaining: int | None = None
        self._rng = random.Random()
        self.injected = {"error": 0, "delay": 0, "lose_response": 0}

    def configure(self, config: FaultConfig) -> None:
        with self._lock:
            self._config = config
            self._remaining = config.count
            self._rng = random.Random(config.seed)

    def clear(self) -> None:
        with self._lock:
            self._config = None
            self._remaining = None

    def reset(self) -> None:
        with self._lock:
            self._config = None
            self._remaining = None
            self.injected = {"error": 0, "delay": 0, "lose_response": 0}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "active": self._config is not None,
                "config": self._config.to_json() if self._config else None,
                "remaining": self._remaining,
                "injected": dict(self.injected),
            }

    def decide(self, method: str, path: str) -> FaultDecision:
        """Draw the fault (if any) for one request; consumes one of ``count``."""
        with self._lock:
            config = self._config
            if config is None or not config.matches(method, path):
                return NO_FAULT
            if self._remaining is not None:
                self._remaining -= 1
                if self._remaining <= 0:
                    self._config = None
                    self._remaining = None
            roll = self._rng.random()
            error = roll < config.error_rate
            lose = not error and roll < config.error_rate + config.lose_response_rate
            if error:
                self.injected["error"] += 1
            if lose:
                self.injected["lose_response"] += 1
            if config.delay_ms:
                self.injected["delay"] += 1
            return FaultDecision(
                error=error,
                should_retry=config.error_should_retry,
                error_saved=config.error_saved,
                error_after_effect=config.error_after_effect,
                lose_response=lose,
                lose_as=config.lose_response_as,
                delay_ms=config.delay_ms,
            )
