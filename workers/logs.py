"""Structured logs: one JSON object per line, carrying payment_id, job_id and role when known.

Secrets never reach a log line: keys named like secrets are dropped, whatever logs them.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_SECRET_WORDS = ("key", "secret", "password", "token", "authorization")
_KEEP = {"idempotency_key"}


def _clean(key: str, value: Any) -> Any:
    if key not in _KEEP and any(word in key.lower() for word in _SECRET_WORDS):
        return "[redacted]"
    if key == "payment_method" and isinstance(value, str):
        return value[:8] + "…" if len(value) > 8 else value
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = _clean(key, value)
        job = line.pop("job", None)
        if isinstance(job, dict):
            line.setdefault("job_id", job.get("id"))
            line.setdefault("role", job.get("queue"))
            kwargs = job.get("task_kwargs") or {}
            if isinstance(kwargs, dict) and "payment_id" in kwargs:
                line.setdefault("payment_id", kwargs["payment_id"])
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # procrastinate logs every job start/end at INFO; keep them for debugging only.
    logging.getLogger("procrastinate").setLevel("WARNING")
    logging.getLogger("httpx").setLevel("WARNING")
    logging.getLogger("stripe").setLevel("WARNING")
