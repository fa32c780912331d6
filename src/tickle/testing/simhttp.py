"""The simulated agents' HTTP/1.1 client: little CPU per request, so the bench's simulator does not
take the cores of the servers it measures ("the bench must not disturb what it measures").

aiohttp cost a simulated agent ~740 µs of CPU for its tickle, pull and events post (S2 of issue
10), a third of the run's CPU on 2 cores. This client is an `asyncio.Protocol` per connection:
a request is its head's bytes and its body's, written at once; an answer is parsed by httptools
(the servers' own parser), by its `Content-Length` or chunked (an answer ending only where the
connection closes is refused: the servers send none). Like the real agent's
client (`tickle.agent.h11http`) it keeps an idle connection `CLIENT_KEEPALIVE_S` for reuse,
closes it then, puts our time on every request (`X-Tickle-Time`), and bounds each request
(connecting, sending, the answer) by a total timeout. A connection failure, or an answer that is
not HTTP, raises an `OSError` (`ProtocolError` for the last); a request over its time limit
raises `TimeoutError`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import httptools

from tickle.clock import TIME_HEADER, header_value
from tickle.httpbase import CLIENT_KEEPALIVE_S

_MAX_HEAD = 65536
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


class ProtocolError(ConnectionError):
    """The server closed the connection before answering, or answered something that is not HTTP."""


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes


class _Connection(asyncio.Protocol):
    """One connection: one request at a time, its answer parsed by httptools (the servers'
    own HTTP parser, uvicorn's): by `Content-Length`, or chunked."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._head_size = 0
        self.reused = False  # carried a request before
        self.heard = False  # a byte of the current request's answer came

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's is not an asyncio.Transport subclass)
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ProtocolError("the server closed the connection before answering"))

    def close(self) -> None:
        self.closed = True
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.transport is not None:
            self.transport.close()

    async def exchange(self, data: bytes) -> Response:
        self.heard = False  # of this request's answer (a closed connection heard none of it)
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ProtocolError("the connection is closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        try:
            return await self._waiter
        finally:
            self._waiter = None

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self._fail(ProtocolError("the server sent bytes nobody asked for"))
            return
        self.heard = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:  # one of ours, raised in a callback
            cause = exc.__context__
            self._fail(cause if isinstance(cause, ProtocolError) else ProtocolError(str(exc)))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"not an HTTP answer ({exc})"))

    # httptools' callbacks, in the order it calls them

    def on_message_begin(self) -> None:
        self._headers = {}
        self._body = []
        self._head_size = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size > _MAX_HEAD:
            raise ProtocolError(f"an answer's head over {_MAX_HEAD} bytes")
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1").strip()

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200 or status in (204, 304):
            return
        if "content-length" not in self._headers and "transfer-encoding" not in self._headers:
            raise ProtocolError("an answer without Content-Length")  # its end would be the close

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._waiter is None or self._waiter.done():
            raise ProtocolError("the server sent more than one answer")
        self._waiter.set_result(
            Response(self._parser.get_status_code(), self._headers, b"".join(self._body))
        )
        if not self._parser.should_keep_alive():
            self.close()

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        if not self.closed:
            self.close()


class SimHttp:
    """Requests to the HTTP server at `url` from `local_host`, keeping connections alive."""

    def __init__(
        self,
        url: str,
        local_host: str | None = None,
        timeout_s: float = 30.0,
        keepalive_s: float = CLIENT_KEEPALIVE_S,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not a plain-HTTP URL: {url}")
        self._host = parts.hostname
        self._port = parts.port or 80
        self._prefix = parts.path.rstrip("/")
        self._local = (local_host, 0) if local_host else None
        self._timeout_s = timeout_s
        self._keepalive_s = keepalive_s
        self._host_line = f"Host: {parts.netloc}\r\n".encode()
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()

    async def request(
        self,
        method: str,
        target: str,
        *,
        body: bytes | None = None,
        headers: bytes = b"",
        timeout_s: float | None = None,
    ) -> Response:
        """Send one request (`target`: path and query; `headers`: whole header lines, each
        ending in CRLF); its answer, whatever its status."""
        if method == "HEAD":  # httptools cannot be told an answer has no body: not needed here
            raise ValueError("HEAD requests are not supported")
        head = b"%s %s%s HTTP/1.1\r\n" % (method.encode(), self._prefix.encode(), target.encode())
        async with asyncio.timeout(self._timeout_s if timeout_s is None else timeout_s):
            while True:
                conn = await self._connection()
                self._busy.add(conn)
                try:
                    now = f"{TIME_HEADER}: {header_value(time.time())}\r\n".encode()
                    data = head + self._host_line + now + headers
                    if body is not None:
                        data += b"Content-Length: %d\r\n\r\n" % len(body) + body
                    else:
                        data += b"\r\n"
                    response = await conn.exchange(data)
                except ProtocolError:
                    conn.close()
                    # as aiohttp: an idempotent request that met a kept-alive connection the
                    # server closed (nothing answered) is sent once more, on a new connection
                    if conn.reused and not conn.heard and method in _IDEMPOTENT:
                        continue
                    raise
                except BaseException:
                    conn.close()
                    raise
                finally:
                    self._busy.discard(conn)
                conn.reused = True
                self._release(conn)
                return response

    async def close(self) -> None:
        """Close every connection (a request still running fails)."""
        for conn in [*self._idle, *self._busy]:
            conn.close()
        self._idle.clear()

    async def _connection(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
                conn.idle_timer = None
            if not conn.closed:
                return conn
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            _Connection, self._host, self._port, local_addr=self._local
        )
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.idle_timer = asyncio.get_running_loop().call_later(
            self._keepalive_s, self._expire, conn
        )
        self._idle.append(conn)

    def _expire(self, conn: _Connection) -> None:
        conn.idle_timer = None
        conn.close()
        if conn in self._idle:
            self._idle.remove(conn)
