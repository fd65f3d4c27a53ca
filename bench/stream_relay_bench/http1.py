"""A minimal HTTP/1.1 client on raw asyncio sockets, for the load generator.

Why raw: httpx or aiohttp cost ~40-50 µs of Python per event, which on 2 cores would make the
client the bottleneck. `Response.feed` parses the head once and de-chunks the body; the bytes
go to a callback with the time they arrived, nothing per event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class HttpError(Exception):
    pass


class Response:
    """One HTTP/1.1 response, parsed incrementally: head, then chunked / sized / close body.

    `on_body(data, now)` gets de-chunked body bytes; `done` resolves at the body's end."""

    def __init__(self, on_body: Callable[[bytes, float], None]) -> None:
        self.on_body = on_body
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head = asyncio.get_running_loop().create_future()  # resolves with the status
        self.done = asyncio.get_running_loop().create_future()
        self._raw = b""
        self._in_head = True
        self._chunked = False
        self._left = -1  # sized body: bytes left; chunked: data left in this chunk
        self._crlf = False  # chunked: the CRLF after a chunk's data is due

    def feed(self, data: bytes, now: float) -> bytes:
        """Consume bytes; return any that belong to the next response (keep-alive)."""
        if self._in_head:
            raw = self._raw + data
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                self._raw = raw
                return b""
            lines = raw[:end].decode("latin-1").split("\r\n")
            self.status = int(lines[0].split(" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            self._in_head, self._raw = False, b""
            self._chunked = "chunked" in self.headers.get("transfer-encoding", "")
            if not self._chunked and "content-length" in self.headers:
                self._left = int(self.headers["content-length"])
            if not self.head.done():
                self.head.set_result(self.status)
            data = raw[end + 4 :]
            if not self._chunked and self._left == 0:
                self._finish()
                return data
        if self._chunked:
            return self._feed_chunked(data, now)
        if self._left < 0:  # until close
            if data:
                self.on_body(data, now)
            return b""
        body, rest = data[: self._left], data[self._left :]
        self._left -= len(body)
        if body:
            self.on_body(body, now)
        if self._left == 0:
            self._finish()
        return rest

    def _feed_chunked(self, data: bytes, now: float) -> bytes:
        raw, pos, out = self._raw + data if self._raw else data, 0, []
        while not self.done.done():
            if self._left > 0:
                piece = raw[pos : pos + self._left]
                if not piece:
                    break
                out.append(piece)
                pos += len(piece)
                self._left -= len(piece)
                if self._left:
                    break
                self._crlf = True
            if self._crlf:
                if len(raw) - pos < 2:
                    break
                pos, self._crlf = pos + 2, False
            eol = raw.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(raw[pos:eol].split(b";", 1)[0], 16)
            if size == 0:  # the last chunk; no trailers expected
                if len(raw) - eol < 4:
                    break
                pos = eol + 4
                self._finish_with(out, now)
                return raw[pos:]
            pos, self._left = eol + 2, size
        self._raw = raw[pos:]
        if out:
            self.on_body(out[0] if len(out) == 1 else b"".join(out), now)
        return b""

    def _finish_with(self, out: list[bytes], now: float) -> None:
        self._raw = b""
        if out:
            self.on_body(b"".join(out), now)
        self._finish()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        for future in (self.head, self.done):
            if not future.done():
                future.set_exception(exc)
                future.exception()  # mark retrieved: a reader that stops early is fine


class Connection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 client connection with one response in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(cls, host, port)
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        now = time.time()
        while data and self.response is not None:
            response = self.response
            data = response.feed(data, now)
            if response.done.done():
                self.response = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.response is not None:
            if (
                not self.response._chunked
                and self.response._left < 0
                and not self.response._in_head
            ):
                self.response._finish()  # a body delimited by the close
            self.response.fail(exc or HttpError("connection closed mid-response"))

    def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes, response: Response
    ) -> None:
        assert self.transport is not None and self.response is None
        self.response = response
        lines = [
            f"{method} {path} HTTP/1.1",
            "Host: 127.0.0.1",
            *(f"{k}: {v}" for k, v in headers.items()),
            f"Content-Length: {len(body)}",
            "",
            "",
        ]
        self.transport.write("\r\n".join(lines).encode("latin-1") + body)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
