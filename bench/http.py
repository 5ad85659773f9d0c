"""A minimal HTTP/1.1 keep-alive client for load generation.

httpx spends more CPU per request than the API under test does, and the load generator
shares the machine's two cores with it; this client only writes a request and reads one
`Content-Length` response per round trip, so the figure measures the API, not the client.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit


class HttpError(Exception):
    pass


# How long one request may take before it counts as failed (a wedged API must not hang the
# bench).
REQUEST_TIMEOUT_SECONDS = 30.0


class Connection:
    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        url = urlsplit(base_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self._reader, self._writer

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """Send one request and return (status, body); HttpError if the connection is lost
        or no answer comes within REQUEST_TIMEOUT_SECONDS (the connection is then closed)."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                return await self._request(method, path, body, headers)
        except TimeoutError as exc:
            await self.close()
            raise HttpError(f"no answer within {REQUEST_TIMEOUT_SECONDS:g} s") from exc

    async def _request(
        self, method: str, path: str, body: Any, headers: dict[str, str] | None
    ) -> tuple[int, bytes]:
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self._fixed}"
            + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
            + ("Content-Type: application/json\r\n" if body is not None else "")
            + f"Content-Length: {len(payload)}\r\n\r\n"
        )
        reader, writer = await self._open()
        try:
            writer.write(head.encode() + payload)
            raw = await reader.readuntil(b"\r\n\r\n")
        except (OSError, asyncio.IncompleteReadError) as exc:
            await self.close()
            raise HttpError(f"connection lost: {exc!r}") from exc
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "content-length" not in fields:
            await self.close()
            raise HttpError(f"response without Content-Length: {lines[0]}")
        data = await reader.readexactly(int(fields["content-length"]))
        if fields.get("connection", "").lower() == "close":
            await self.close()
        return status, data

    async def close(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
