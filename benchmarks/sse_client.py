"""A minimal HTTP/1.1 client for streamed POSTs (keep-alive, chunked transfer decoding, SSE lines), so a benchmark
that drives a gateway with many streams measures the gateway rather than a general-purpose client's overhead
(httpx spent ~3x the gateway's own CPU per stream here)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator


class SSEConnection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, path: str, body: dict) -> AsyncIterator[bytes]:
        """POST body as JSON; yields each `data:` line's payload (bytes) of the event stream answered."""
        if self.writer is None or self.writer.is_closing():
            await self._connect()
        payload = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
                          f"content-length: {len(payload)}\r\n\r\n".encode() + payload)
        status = await self.reader.readline()
        if not status:
            raise ConnectionError("the server closed the connection")
        code = int(status.split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") != "chunked":
            data = await self.reader.readexactly(int(headers.get("content-length", "0")))
            if code != 200:
                raise RuntimeError(f"HTTP {code}: {data[:200]!r}")
            yield data
            return
        pending = b""
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                return
            pending += chunk[:-2]
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"data: "):
                    yield line[6:]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
