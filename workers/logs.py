"""Structured logs: one JSON object per line, carrying payment_id, job_id and role when known.

A worker sets them once per job (`job_context`) and for the whole process (`set_role`), so
every line logged while a job runs carries them, whoever logs it. Secrets never reach a log
line: values of keys named like secrets are replaced by "[redacted]", whatever logs them,
and a payment method is cut to its first 8 characters.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import logging.config
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_SECRET_WORDS = ("key", "secret", "password", "token", "authorization", "cvc", "card")
# Secrets that may hide in free text (a message, an exception): provider keys, webhook
# secrets, agent keys, bearer credentials.
_SECRET_TEXT = re.compile(
    r"(sk|rk|pk)_(test|live)_[A-Za-z0-9_]+|whsec_[A-Za-z0-9_]+|apk_[A-Za-z0-9_\-]+"
    r"|(?i:bearer|basic)\s+[A-Za-z0-9._~+/=\-]+"
)
# A password in a connection string (psycopg's pool logs the conninfo it fails to reach) or
# beside its name: `scheme://user:PASSWORD@host` (up to the last `@` before the host),
# `password=PASSWORD`, `PGPASSWORD=…`, `password: …`, `'password': '…'`.
_URL_PASSWORD = re.compile(r"(://[^/\s:@]*):[^/\s?#]*@")
_NAMED_PASSWORD = re.compile(
    r"""(?i)((?<![A-Za-z0-9])\w*password['"]?\s*[=:]\s*)"""
    r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s&;,'"}]+)"""
)
_KEEP = {"idempotency_key"}

_role: str | None = None
_job: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "agentpay_log_job", default=None
)


def set_role(role: str | None) -> None:
    """The role of this process: on every line it logs."""
    global _role
    _role = role


@contextlib.contextmanager
def job_context(job_id: int | None, payment_id: str | None, role: str | None) -> Iterator[None]:
    """While the block runs (in this task), lines carry this job's ids."""
    token = _job.set({"job_id": job_id, "payment_id": payment_id, "role": role})
    try:
        yield
    finally:
        _job.reset(token)


def scrub(text: str) -> str:
    """`text` with anything that looks like a key or credential replaced."""
    text = _URL_PASSWORD.sub(r"\1:[redacted]@", text)
    text = _NAMED_PASSWORD.sub(r"\1[redacted]", text)
    return _SECRET_TEXT.sub("[redacted]", text)


def _clean(key: str, value: Any) -> Any:
    if key not in _KEEP and any(word in key.lower() for word in _SECRET_WORDS):
        return "[redacted]"
    if key == "payment_method" and isinstance(value, str):
        return value[:8] + "…" if len(value) > 8 else value
    if isinstance(value, dict):
        return {k: _clean(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(key, v) for v in value]
    if isinstance(value, str):
        return scrub(value)
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": scrub(record.getMessage()),
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
        for key, value in (_job.get() or {}).items():
            if value is not None:
                line.setdefault(key, value)
        if _role is not None:
            line.setdefault("role", _role)
        if record.exc_info:
            line["exc"] = scrub(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


def dict_config(level: str = "INFO") -> dict[str, Any]:
    """The logging set-up of every agentpay process, for `logging.config.dictConfig` (uvicorn
    applies it again in each API process it spawns): JSON lines on stderr."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "workers.logs.JsonFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            # procrastinate logs every job start/end at INFO; keep them for debugging only.
            "procrastinate": {"level": "WARNING"},
            "httpx": {"level": "WARNING"},
            "stripe": {"level": "WARNING"},
        },
    }


def configure(level: str = "INFO") -> None:
    logging.config.dictConfig(dict_config(level))
