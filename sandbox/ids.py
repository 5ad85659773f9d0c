"""Stripe-style object ids and timestamps."""

from __future__ import annotations

import secrets
import string
import time

__all__ = ["new_id", "now", "random_token"]

_ALPHABET = string.ascii_letters + string.digits


def random_token(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))


def new_id(prefix: str, length: int = 24) -> str:
    """``new_id("pi")`` -> ``"pi_3Pq..."`` (prefix, underscore, random base62)."""
    return f"{prefix}_{random_token(length)}"


def now() -> int:
    """Unix seconds, the type of every ``created`` field."""
    return int(time.time())
