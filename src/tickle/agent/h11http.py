"""The agent's HTTP/1.1: h11 (a sans-I/O HTTP/1.1 library) over asyncio streams, TLS by `ssl`.

aiohttp cost the agent at rest a fifth of its memory (S7 of issue 10); the agent needs little of
it: a client of one task server at a time (keep-alive, a total timeout per request, TLS with the
CA checked, the clock headers) and the small server of its control socket.

`HttpClient` keeps idle connections `CLIENT_KEEPALIVE_S` for reuse, at most `limit` at once. A
connection failure, a TLS failure or an answer that is not HTTP raise an `OSError`
(`ProtocolError` for the last); a request over its time limit raises `TimeoutError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import h11

from tickle import __version__
from tickle.clock import TIME_HEADER, Clock, header_value, parse_header
from tickle.httpbase import CLIENT_KEEPALIVE_S

if TYPE_CHECKING:  # imported by the first HTTPS connection: a plain-HTTP agent has no ssl
    import ssl

log = logging.getLogger(__name__)

_READ_SIZE = 65536
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_USER_AGENT = f"tickle-agent/{__version__}"
# the bound of a control request's head, and of its body (the control API reads none)
_MAX_REQUEST_BYTES = 16384


class ProtocolError(ConnectionError):
    """The peer closed the connection before answering, or answered something that is not HTTP."""


class ClosedBeforeAnswer(ProtocolError):
    """The peer closed the connection before any of its answer."""


class BodyTooLarge(ProtocolError):
    """A message's body over the bound its reader set."""


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0
    reused: bool = False  # taken from the idle ones: it carried an answer before

    def usable(self, keepalive_s: float) -> bool:
        """Whether an idle connection may carry another request (the server has not closed it)."""
        fresh = time.monotonic() - self.idle_since < keepalive_s
        return fresh and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    """Requests to HTTP(S) servers, or to one unix socket (`unix_path`), with keep-alive.

    Every request carries our time (`X-Tickle-Time`); each answer carrying the server's gives
    `on_offset` one sample of the server's offset from us: its time minus the midpoint of the
    round trip (positive: its clock is ahead).
    """

    def __init__(
        self,
        *,
        timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        local_addr: tuple[str, int] | None = None,
        unix_path: str | None = None,
        limit: int = 10,
        keepalive_s: float = CLIENT_KEEPALIVE_S,
        clock: Clock = time.time,
        on_offset: Callable[[float], None] | None = None,
    ) -> None:
        self._timeout_s = timeout_s
        self._ssl = ssl_context
        self._local_addr = local_addr
        self._unix_path = unix_path
        self._slots = asyncio.Semaphore(limit)
        self._keepalive_s = keepalive_s
        self._clock = clock
        self._on_offset = on_offset
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._busy: set[_Connection] = set()

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Response:
        """Send one request; its answer, whatever its status. `timeout_s` (default: the
        client's) bounds all of it: waiting for a connection, connecting, sending, the answer."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"not an HTTP URL: {url}")
        host = parts.hostname or ""
        port = parts.port or (443 if scheme == "https" else 80)
        target = parts.path or "/"
        query = "&".join(q for q in (parts.query, urlencode(params or {})) if q)
        if query:
            target += "?" + query
        head = [("Host", parts.netloc or "localhost"), ("User-Agent", _USER_AGENT)]
        head += list((headers or {}).items())
        if body is not None:
            head.append(("Content-Length", str(len(body))))
        async with asyncio.timeout(self._timeout_s if timeout_s is None else timeout_s):
            async with self._slots:
                fresh = False
                while True:
                    conn = await self._connection((scheme, host, port), fresh)
                    self._busy.add(conn)
                    try:
                        response = await self._exchange(conn, method, target, list(head), body)
                    except ConnectionError as exc:
                        conn.close()
                        # as aiohttp and urllib3: an idempotent request on a kept-alive
                        # connection the server closed meanwhile (reset, or closed before any
                        # answer) goes once more, on a new connection (a crowded task server
                        # closes connections idle 0.1 s: one taken for an agent's pull, issue 10)
                        lost = isinstance(exc, ClosedBeforeAnswer) or not isinstance(
                            exc, ProtocolError
                        )
                        if lost and conn.reused and method in _IDEMPOTENT:
                            fresh = True
                            continue
                        raise
                    except BaseException:
                        conn.close()
                        raise
                    finally:
                        self._busy.discard(conn)
                    self._release((scheme, host, port), conn)
                    return response

    async def close(self) -> None:
        """Close every connection (a request still running fails)."""
        conns = [c for idle in self._idle.values() for c in idle] + list(self._busy)
        self._idle.clear()
        for conn in conns:
            conn.close()
        # bounded: a TLS peer that never acknowledges the close must not hold the agent's stop
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                for conn in conns:
                    with contextlib.suppress(OSError):
                        await conn.writer.wait_closed()

    async def _connection(self, key: tuple[str, str, int], fresh: bool = False) -> _Connection:
        """An idle connection to `key` the server has not closed, else a new one (`fresh`:
        a new one)."""
        idle = [] if fresh else self._idle.get(key, [])
        while idle:
            conn = idle.pop()
            if conn.usable(self._keepalive_s):
                conn.reused = True
                return conn
            conn.close()
        scheme, host, port = key
        if self._unix_path is not None:
            reader, writer = await asyncio.open_unix_connection(self._unix_path)
        else:
            tls: ssl.SSLContext | None = None
            if scheme == "https":
                tls = self._ssl or _default_tls()
            # a name with IPv6 and IPv4 addresses: each tried 0.25 s after the last (as aiohttp)
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls, local_addr=self._local_addr, happy_eyeballs_delay=0.25
            )
        return _Connection(reader, writer)

    def _release(self, key: tuple[str, str, int], conn: _Connection) -> None:
        state = conn.h11
        if state.our_state is h11.DONE and state.their_state is h11.DONE:
            state.start_next_cycle()
            conn.idle_since = time.monotonic()
            self._idle.setdefault(key, []).append(conn)
        else:
            conn.close()

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        target: str,
        head: list[tuple[str, str]],
        body: bytes | None,
    ) -> Response:
        sent_at = self._clock()
        head.append((TIME_HEADER, header_value(sent_at)))
        state = conn.h11
        try:
            data = state.send(h11.Request(method=method, target=target, headers=head)) or b""
            if body:
                data += state.send(h11.Data(data=body)) or b""
            data += state.send(h11.EndOfMessage()) or b""
            conn.writer.write(data)
            await conn.writer.drain()
            answer, chunks = await _read_message(state, conn.reader, h11.Response)
        except h11.ProtocolError as exc:
            raise ProtocolError(f"bad HTTP from the server: {exc}") from None
        headers = _headers(answer.headers)
        if self._on_offset is not None:
            now = self._clock()
            theirs = parse_header(headers.get(TIME_HEADER.lower()), now)
            if theirs is not None:
                self._on_offset(theirs - (sent_at + now) / 2)
        return Response(answer.status_code, headers, b"".join(chunks))


async def _read_message(
    state: h11.Connection,
    reader: asyncio.StreamReader,
    kind: type[Any],
    max_body: int | None = None,
) -> tuple[Any, list[bytes]]:
    """The next request or response (`kind`) on `state` and its body's parts; None as the
    first when the peer closed the connection before it began. `BodyTooLarge` past `max_body`."""
    start: Any = None
    chunks: list[bytes] = []
    size = 0
    while True:
        event = state.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(_READ_SIZE)
            if not data and start is None and kind is h11.Response:
                # h11 calls this a protocol error of the server: it is a close, nothing answered
                raise ClosedBeforeAnswer("the server closed the connection before answering")
            state.receive_data(data)
        elif isinstance(event, kind):
            start = event
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
            size += len(event.data)
            if max_body is not None and size > max_body:
                raise BodyTooLarge(f"a body over {max_body} bytes")
        elif isinstance(event, h11.EndOfMessage):
            return start, chunks
        elif isinstance(event, h11.ConnectionClosed):
            if kind is h11.Request and start is None:
                return None, []
            raise ProtocolError("the server closed the connection before answering")


def _headers(raw: Any) -> dict[str, str]:
    return {bytes(k).decode("latin-1"): bytes(v).decode("latin-1") for k, v in raw}


# --- the control socket's server -----------------------------------------------------------------

# an answer: status, content type, body
Answer = tuple[int, str, bytes]
Handler = Callable[[], Awaitable[Answer]]


def json_answer(data: Any, status: int = 200) -> Answer:
    return status, "application/json; charset=utf-8", json.dumps(data).encode()


class HttpServer:
    """Serves `routes` ({(method, path): handler}) on sockets, keeping connections alive.

    A connection that sends no whole request for `idle_s` is closed; a request with a head or a
    body over 16 KiB is refused (431, 413).
    """

    def __init__(self, routes: dict[tuple[str, str], Handler], idle_s: float = 60.0) -> None:
        self._routes = routes
        self._idle_s = idle_s
        self._servers: list[asyncio.Server] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve on a bound unix socket."""
        self._servers.append(await asyncio.start_unix_server(self._connected, sock=sock))

    async def serve_tcp(self, host: str, port: int) -> None:
        self._servers.append(await asyncio.start_server(self._connected, host, port))

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        state = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST_BYTES)
        try:
            while True:
                try:
                    async with asyncio.timeout(self._idle_s):
                        request, _body = await _read_message(
                            state, reader, h11.Request, max_body=_MAX_REQUEST_BYTES
                        )
                except (h11.RemoteProtocolError, BodyTooLarge) as exc:
                    status = 413 if isinstance(exc, BodyTooLarge) else exc.error_status_hint
                    if state.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await _respond(state, writer, (status, "text/plain", b"refused\n"))
                    return
                if request is None:
                    return
                # h11 bounds a head still arriving; one that came whole is bounded here
                head = len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)
                if head > _MAX_REQUEST_BYTES:
                    await _respond(state, writer, (431, "text/plain", b"refused\n"))
                    return
                answer = await self._answer(request)
                await _respond(state, writer, answer)
                if state.our_state is not h11.DONE or state.their_state is not h11.DONE:
                    return
                state.start_next_cycle()
        except (OSError, TimeoutError, h11.ProtocolError):
            return
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _answer(self, request: Any) -> Answer:
        method = bytes(request.method).decode("latin-1")
        path = bytes(request.target).decode("latin-1").split("?", 1)[0]
        handler = self._routes.get((method, path))
        if handler is not None:
            try:
                return await handler()
            except Exception:
                log.exception("the control API failed to answer %s %s", method, path)
                return 500, "text/plain", b"internal error\n"
        if any(p == path for _, p in self._routes):
            return 405, "text/plain", b"method not allowed\n"
        return 404, "text/plain", b"not found\n"


async def _respond(state: h11.Connection, writer: asyncio.StreamWriter, answer: Answer) -> None:
    status, content_type, body = answer
    head = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    data = state.send(h11.Response(status_code=status, headers=head)) or b""
    data += state.send(h11.Data(data=body)) or b""
    data += state.send(h11.EndOfMessage()) or b""
    writer.write(data)
    await writer.drain()


def _default_tls() -> ssl.SSLContext:
    """A verifying context of the system trust store (ssl imported only here)."""
    import ssl

    return ssl.create_default_context()
