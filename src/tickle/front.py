"""A connection's front: the requests a fast path answers at once, without uvicorn's machinery.

An agent tickled by its task server opens a connection and pulls its tasks: one small GET that
the task server answers from memory (`FastPath.served_now`). Served by `LimitedHttpProtocol`,
uvicorn's protocol with our limits, each such connection and request cost ~90 µs of the task
server's CPU, two thirds of it uvicorn's per-connection and per-request Python (the protocol's
state, the peer's addresses, the ASGI scope, its cycle, the deadlines) where a bare protocol
answering the same request costs ~30 µs: at a fan-out the task server's one core is what the
agents' pulls wait for (issue 10, S5).

`AtOnceFront` is each connection's protocol until its client sends anything else. A read that
is one whole request the fast path answers at once (a GET of one of its `served_now` paths,
without a body or a proxy header, within the head limits) is answered here, kept alive; the
first read that is anything else (a status event's post, a request split over reads, two
pipelined, a malformed one, one the fast path passes on) hands the connection over to a
`LimitedHttpProtocol`, that read replayed into it, which serves it and every later request as
before: the limits, deadlines, refusals and the connection cap apply as they did. The front
keeps the connection cap too (it is in the `ConnectionTable`), a deadline for the first request
(handed over at it: 408, as before), and the keep-alive after an answer.

With a `RequestHold` (a task server's fan-out), the request following a pull on its connection,
if it is one the hold puts off (an agent's status events), is not even parsed while the spell
lasts: its read is kept, the connection paused, and it is handed over when the hold releases it,
with the time it arrived.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

import httptools
import uvicorn
from starlette.types import Scope
from uvicorn.server import ServerState

from tickle.clock import header_value
from tickle.fastpath import Parts, PassOn, ServeNow
from tickle.serving import (
    _JSON_HEADERS,
    _PROXY_HEADERS,
    _TEXT_HEADERS,
    _TIME_HEADER,
    ARRIVED_AT,
    LimitedHttpProtocol,
    ServingConfig,
    answer_bytes,
)

log = logging.getLogger(__name__)

_ASGI = {"version": "3.0", "spec_version": "2.3"}
_CONNECTION_HEADERS = frozenset({b"connection", b"transfer-encoding"})
# a request with one of these goes to the protocol: a body (framed by either), a proxy's
# header (read by uvicorn's proxy-headers middleware, `serving._PROXY_HEADERS`)
_ODD_HEADERS = frozenset({b"content-length", b"transfer-encoding", *_PROXY_HEADERS})
_JSON_HEAD = b"".join(b"%s: %s\r\n" % header for header in _JSON_HEADERS)
# the server's own headers (uvicorn's list, renewed every second) and those joined
_defaults: tuple[list[tuple[bytes, bytes]], bytes] = ([], b"")


class AtOnceFront(asyncio.Protocol):
    """A connection's protocol while its client sends only requests answered at once (see the
    module's docstring); `ServingConfig(..., http=AtOnceFront)`."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        assert isinstance(config, ServingConfig), "serve with ServingConfig"
        if not config.loaded:
            config.load()
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.loop = _loop or asyncio.get_event_loop()
        self.served_now = _served_now(config)
        self.limits = config.limits
        self.table = config.connections
        self.hold = config.request_hold
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpRequestParser | None = None
        self.client: tuple[str, int] | None = None
        self.server: tuple[str, int] | None = None
        self.scheme = "http"
        self.timer: asyncio.TimerHandle | None = None  # the first request's deadline, or idle
        self.after_first = False  # answered one of `hold.first` during the spell
        self.kept: bytes | None = None  # a request put off (`hold`), not parsed yet
        # the request being read (parser callbacks)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.begun = 0
        self.complete = 0
        self.method = ""
        self.keep_alive = False  # HTTP/1.1, and its client did not say `Connection: close`
        self.odd = False  # a header that keeps it from the front (`_ODD_HEADERS`)

    # --- the connection -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.server_state.connections.add(self)  # type: ignore[arg-type]  # shutdown() below
        if not self.served_now or not self.table.admit(self):
            self.hand_over(b"")  # it refuses the connection at the cap, as before
            return
        self.client = _address(transport.get_extra_info("peername"))
        self.server = _address(transport.get_extra_info("sockname"))
        if self.config.is_ssl:
            self.scheme = "https"
        self.parser = httptools.HttpRequestParser(self)
        self.timer = self.loop.call_later(self.limits.request_head_timeout_s, self._too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        if self.transport is not None and exc is None:
            self.transport.close()

    def evict(self) -> None:
        """Close this connection (it waits for its next request) to make room for a new one."""
        self.config.metrics.http_refused.labels(reason="evicted").inc()
        self._forget()
        assert self.transport is not None
        self.transport.close()

    def shutdown(self) -> None:
        """The server stops (uvicorn's graceful shutdown): close; no request is half served."""
        assert self.transport is not None
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.kept is not None:  # paused: what was read with the request put off
            self.kept += data
            return
        self._cancel_timer()
        after_first, self.after_first = self.after_first, False
        if after_first and self._puts_off(data):
            return
        if not self._answer(data):
            self.hand_over(data)

    def hand_over(
        self, data: bytes, arrived_at: float | None = None, passed_on: bool = False
    ) -> LimitedHttpProtocol:
        """Give the connection to a `LimitedHttpProtocol`, `data` (from a request's start) its
        first read."""
        self._forget()
        conn = LimitedHttpProtocol(self.config, self.server_state, self.app_state, self.loop)
        assert self.transport is not None
        self.transport.set_protocol(conn)
        conn.connection_made(self.transport)
        conn.first_arrived_at = arrived_at
        conn.first_passed_on = passed_on
        if data and not self.transport.is_closing():
            conn.data_received(data)
        return conn

    def _forget(self) -> None:
        self._cancel_timer()
        self.parser = None  # it holds this protocol's methods: no cycle left for the collector
        self.table.discard(self)
        self.server_state.connections.discard(self)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _too_slow(self) -> None:
        """No whole request within the head deadline: refused as `LimitedHttpProtocol` does."""
        self.timer = None
        self.hand_over(b"")._too_slow("head", self.limits.request_head_timeout_s)

    def _idle(self) -> None:
        """Kept alive as long as uvicorn keeps a connection: closed."""
        self.timer = None
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.close()

    # --- a request put off ---------------------------------------------------------------------

    def _puts_off(self, data: bytes) -> bool:
        """Whether the request starting `data` is one the hold puts off now: kept unread."""
        assert self.hold is not None
        assert self.transport is not None
        line_end = data.find(b"\r\n")
        _method, _, rest = data[: line_end if line_end >= 0 else len(data)].partition(b" ")
        target, space, _ = rest.partition(b" ")
        if not space:  # not the whole request line: whatever it is, not put off here
            return False
        path = target.partition(b"?")[0].decode("latin-1")
        if "%" in path or not self.hold.still_busy(path):
            return False
        self.kept = data
        arrived = time.time()
        self.transport.pause_reading()
        self.table.served(self)  # the server's turn now: never closed for another
        self.hold.hold(lambda: self._release(arrived))
        return True

    def _release(self, arrived: float) -> None:
        kept, self.kept = self.kept, None
        if kept is None or self.transport is None or self.transport.is_closing():
            return
        self.transport.resume_reading()
        self.hand_over(kept, arrived_at=arrived)

    # --- a request answered at once --------------------------------------------------------------

    def _answer(self, data: bytes) -> bool:
        """Answer `data` if it is one whole request the fast path answers at once; False, with
        nothing written, if it is anything else."""
        if len(data) > self.limits.max_header_bytes or not data.endswith(b"\r\n\r\n"):
            return False
        parser = self.parser
        assert parser is not None
        assert self.transport is not None
        self.begun = self.complete = 0
        self.keep_alive = self.odd = False
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return False  # the protocol answers it (400), from the start of `data`
        if (
            self.begun != 1
            or self.complete != 1
            or self.odd
            or len(self.headers) > self.limits.max_headers
            or not self.keep_alive
        ):
            return False
        try:
            parsed = httptools.parse_url(self.url)
        except httptools.HttpParserInvalidURLError:
            return False
        raw_path = parsed.path
        path = raw_path.decode("ascii", "replace")
        served = self.served_now.get((self.method, path))
        if served is None or "%" in path:
            return False
        scope: Scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": "1.1",
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": "",
            "headers": self.headers,
            "state": {**self.app_state, ARRIVED_AT: time.time()},
            "method": "GET",
            "path": path,
            "raw_path": raw_path,
            "query_string": parsed.query or b"",
        }
        serve_now, parameters = served
        try:
            body = serve_now(Parts(scope, parameters), scope)
        except PassOn:
            self.hand_over(data, passed_on=True)
            return True
        except Exception:  # as uvicorn answers an app's error: 500, and the connection closed
            log.exception("Exception in the fast path serving %s", path)
            self._write(path, 500, _TEXT_HEADERS, b"Internal Server Error", keep_alive=False)
            return True
        self.transport.write(self._ok(body))
        self._answered(path, keep_alive=True)
        return True

    def _write(
        self,
        path: str,
        status: int,
        headers: tuple[tuple[bytes, bytes], ...],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        assert self.transport is not None
        whole = ((b"content-length", str(len(body)).encode()), *headers)
        answer = answer_bytes(self.server_state.default_headers, status, whole, body, keep_alive)
        assert answer is not None, "no header of the server's own on the connection (__init__)"
        self.transport.write(answer)
        self._answered(path, keep_alive)

    def _ok(self, body: bytes) -> bytes:
        """A 200 with this JSON `body`, kept alive: `answer_bytes`'s, the server's own headers
        joined once a second (uvicorn renews them, with the date, every second)."""
        global _defaults
        defaults = self.server_state.default_headers
        if _defaults[0] is not defaults:
            _defaults = (defaults, b"".join(b"%s: %s\r\n" % header for header in defaults))
        return b"HTTP/1.1 200 OK\r\n%scontent-length: %d\r\n%s%s: %s\r\n\r\n%s" % (
            _defaults[1], len(body), _JSON_HEAD, _TIME_HEADER, header_value(time.time()).encode(),
            body,
        )  # fmt: skip

    def _answered(self, path: str, keep_alive: bool) -> None:
        assert self.transport is not None
        self.server_state.total_requests += 1
        if not keep_alive:
            self._forget()
            self.transport.close()
            return
        self.table.waiting(self)
        if self.hold is not None:
            self.after_first = self.hold.answered(path)
        self.timer = self.loop.call_later(self.config.timeout_keep_alive, self._idle)

    # --- parser callbacks (httptools) ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self.begun += 1
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        value = value.rstrip(b" \t")
        self.headers.append((name, value))
        if name in _ODD_HEADERS and (name != b"content-length" or value.strip() != b"0"):
            self.odd = True  # a body (any but a declared 0) or a proxy's header: not here

    def on_headers_complete(self) -> None:
        # read here: once the message is complete the parser stands ready for the next one
        assert self.parser is not None
        self.method = self.parser.get_method().decode("ascii", "replace")
        self.keep_alive = (
            self.parser.get_http_version() == "1.1" and self.parser.should_keep_alive()
        )

    def on_message_complete(self) -> None:
        self.complete += 1


def _served_now(config: ServingConfig) -> dict[tuple[str, str], tuple[ServeNow, frozenset[str]]]:
    """The requests answered at the front: the fast path's `served_now`, where nothing between
    the connection and the fast path changes a request or its answer (no root path, no
    concurrency limit of uvicorn's, no header of the server's own on the connection)."""
    if config.front_served_now is None:
        lane = config.fast_lane
        config.front_served_now = (
            lane.served_now
            if lane is not None
            and not config.root_path
            and config.limit_concurrency is None
            and not any(name in _CONNECTION_HEADERS for name, _ in config.encoded_headers)
            else {}
        )
    return config.front_served_now


def _address(address: Any) -> tuple[str, int] | None:
    if isinstance(address, tuple) and len(address) >= 2:
        return str(address[0]), int(address[1])
    return None
