"""Stripe's idempotency keys: replay saved results, refuse reuse with other parameters.

Keys are scoped per API key. A key is *in flight* from the moment an endpoint starts executing
until its result is saved (or discarded, for results Stripe does not save).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["IdempotencyOutcome", "IdempotencyStore", "SavedResponse"]


@dataclass(frozen=True)
class SavedResponse:
    status: int
    body: bytes
    request_id: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Entry:
    method: str
    path: str
    params: dict[str, Any]
    response: SavedResponse | None = None  # None while the first request is in flight


@dataclass(frozen=True)
class IdempotencyOutcome:
    kind: Literal["new", "replay", "in_flight", "mismatch"]
    saved: SavedResponse | None = None
    first_path: str | None = None


class IdempotencyStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self.replays = 0
        self.conflicts = 0
        self.mismatches = 0

    def begin(
        self, api_key: str, key: str, method: str, path: str, params: dict[str, Any]
    ) -> IdempotencyOutcome:
        """Claim ``key`` for this request, or say why it cannot run."""
        with self._lock:
            entry = self._entries.get((api_key, key))
            if entry is None:
                self._entries[(api_key, key)] = _Entry(method, path, params)
                return IdempotencyOutcome("new")
            if entry.response is None:
                self.conflicts += 1
                return IdempotencyOutcome("in_flight")
            if (entry.method, entry.path, entry.params) != (method, path, params):
                self.mismatches += 1
                return IdempotencyOutcome("mismatch", first_path=entry.path)
            self.replays += 1
            return IdempotencyOutcome("replay", saved=entry.response)

    def finish(self, api_key: str, key: str, response: SavedResponse | None) -> None:
        """Save the result of a claimed key, or release the claim when ``response`` is None."""
        with self._lock:
            if response is None:
                self._entries.pop((api_key, key), None)
                return
            entry = self._entries.get((api_key, key))
            if entry is not None:
                entry.response = response

    def in_flight(self) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() if e.response is None)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "keys": len(self._entries),
                "in_flight": sum(1 for e in self._entries.values() if e.response is None),
                "replays": self.replays,
                "conflicts": self.conflicts,
                "mismatches": self.mismatches,
            }

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.replays = self.conflicts = self.mismatches = 0
