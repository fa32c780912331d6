"""How the NS and the task servers serve their HTTP APIs: uvicorn, within request limits.

uvicorn bounds neither request bodies nor the number or size of headers, and gives a client that
stops halfway through a request all the time it wants. Three pieces add what it lacks, each set by
the component's `ApiServerSettings`:

- `ServingConfig`, the uvicorn configuration an API runs with: it raises the process's soft limit
  on open files to its hard limit and caps the API's connections below it;
  long-polls (requests idle by design, on the paths it is given) have a cap of their own, so that
  they neither count against the connections of the other requests nor can be closed for them;
- `LimitedHttpProtocol`, uvicorn's httptools protocol with the connection-level limits: the size
  and number of headers (431), a deadline for the request head and one for the body (408), and
  the cap, at which the connection waiting longest on its client is closed for a new one, so
  half-sent requests cannot lock out `/health` and the peers that send whole requests;
- `BodyLimits`, ASGI middleware refusing a body over its limit (413) before it is read into
  memory: registrations, and requests without valid credentials, get the small limit;
- `ClockHeaders`, ASGI middleware noting when each request arrived (the peer's clock offset is
  measured against it) and putting the server's time on every answer (`X-Tickle-Time`).

`RequestHold` puts requests off for a spell after a request that matters more on the same
connection (a task server's fan-out: every agent's pull before any agent's status events).

`FastLane` serves an app's fast path (`tickle.fastpath`) at the connection: its requests skip the
ASGI middleware, the lane doing for them what `ClockHeaders` and `BodyLimits` do; a request
without a body that the fast path answers at once (`FastPath.served_now`) is answered as soon as
its end is read, in the protocol's own callback, without an ASGI task; a task server's
connections start with `tickle.front.AtOnceFront`, which answers those with less still and
hands the connection over to `LimitedHttpProtocol` at its first other request.

Beside the limits: `JsonRoute`, the route class of every API route (pydantic-core's JSON parser,
plain endpoints and dependencies on the route threads, one trip each), `run_server`, the
servers' event loop start (uvloop), `settle_gc`, their garbage collector once started, and
`CollectorPause`, its passes put off while a burst lasts.

Every refusal is counted in `tickle_http_refused` by reason, and not logged one by one: a flood
of bad requests must not flood the log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import functools
import gc
import inspect
import json
import logging
import math
import resource
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable
from typing import Annotated, Any, Protocol, TypeVar, cast, get_args, get_origin

import pydantic
import pydantic_core
import uvicorn
from fastapi import Query, Request, Response, params
from fastapi.routing import APIRoute
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from tickle.clock import TIME_HEADER, header_value
from tickle.config import ApiServerSettings
from tickle.fastpath import PASSED_ON, FastPath, Parts, PassOn, Replay, Serve, ServeNow
from tickle.metrics import ComponentMetrics

# /metrics?name[]=...: only those metrics, as Prometheus's own exporters take it (a scrape that
# reads one counter does not make the NS count its computers)
MetricNames = Annotated[
    list[str],
    Query(alias="name[]", description="Only these metrics (none named: all)"),
]

log = logging.getLogger(__name__)
T = TypeVar("T")

# descriptors kept for what is not an API connection: databases, sockets to peers, logs
FD_RESERVE = 256
# how long a refused client may go on sending before its connection is closed anyway
LINGER_S = 2.0
# how long the APIs keep an idle connection open: longer than their clients keep one idle for
# reuse (`tickle.http.CLIENT_KEEPALIVE_S`), so the client always closes first
SERVER_KEEPALIVE_S = 20
# a 503 (no room, too busy) says when to try again: its client waits at least this, with jitter
RETRY_AFTER_S = 2
# the reasons of `tickle_http_refused`
REFUSALS = (
    "body_too_large",
    "head_too_large",
    "too_many_headers",
    "head_timeout",
    "body_timeout",
    "evicted",
    "over_capacity",
)

# whether a bearer token is one this server issued (checked before a large body is read)
TokenCheck = Callable[[str, Scope], Awaitable[bool]]


class ServingConfig(uvicorn.Config):
    """uvicorn's configuration for an API served within `limits` (pass uvicorn's own options).

    Building it raises the process's soft limit on open files to the hard limit (systemd's
    `LimitNOFILE`): the connection cap is what that limit leaves, at most `max_connections`.
    """

    def __init__(
        self,
        app: ASGIApp,
        limits: ApiServerSettings,
        metrics: ComponentMetrics,
        long_poll_paths: Collection[str] = (),
        max_long_polls: int = 0,
        request_hold: RequestHold | None = None,
        **options: Any,
    ) -> None:
        """`long_poll_paths`: the routes whose requests wait by design (up to `max_long_polls`
        at once, beside the `max_connections`); `request_hold`: see `RequestHold`."""
        self.limits = limits
        self.request_hold = request_hold
        self.metrics = metrics
        self.long_poll_paths = frozenset(long_poll_paths)
        open_files = raise_open_file_limit()
        cap = connection_cap(limits.max_connections, open_files)
        if cap < limits.max_connections:
            log.warning(
                "max_connections %d lowered to %d: this process may open only %d files "
                "(raise LimitNOFILE)",
                limits.max_connections, cap, open_files,
            )  # fmt: skip
        long_polls = min(max_long_polls, max(0, open_files - FD_RESERVE - cap))
        if long_polls < max_long_polls:
            log.warning(
                "max_long_polls %d lowered to %d: this process may open only %d files "
                "(raise LimitNOFILE)",
                max_long_polls, long_polls, open_files,
            )  # fmt: skip
        self.max_long_polls = long_polls
        self.connections = ConnectionTable(cap, long_polls)
        if request_hold is not None:
            request_hold.crowded = self.connections.crowded
            self.connections.on_crowded.append(request_hold.release_now)
        self.fast_lane = FastLane.of(app)
        # what `tickle.front.AtOnceFront` answers (worked out by its first connection)
        self.front_served_now: dict[tuple[str, str], tuple[ServeNow, frozenset[str]]] | None = None
        for reason in REFUSALS:
            metrics.http_refused.labels(reason=reason)
        # asyncio accepts up to `backlog` connections at once before any is admitted to the table:
        # past the descriptors left, accept() fails and the server stops accepting for a second
        options.setdefault("backlog", min(2048, max(16, (open_files - cap) // 2)))
        options.setdefault("timeout_keep_alive", SERVER_KEEPALIVE_S)
        # no WebSocket routes: an upgrade would take the connection out of the table
        # `http`: LimitedHttpProtocol, or a front that hands connections over to it
        # (`tickle.front`)
        options.setdefault("http", LimitedHttpProtocol)
        super().__init__(app, ws="none", **options)


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        else:
            soft = target
    return int(soft)


def connection_cap(max_connections: int, open_files: int) -> int:
    """How many API connections may be open at once with `open_files` descriptors."""
    return min(max_connections, max(open_files - FD_RESERVE, open_files // 2))


class TableMember(Protocol):
    """A connection as `ConnectionTable` keeps it."""

    def evict(self) -> None:
        """Close it, waiting on its client, to make room for a new one."""


class ConnectionTable:
    """The open connections of one API server, and which may be closed to make room.

    A connection waits on its client from when it opens, or its last answer was sent, until its
    request is complete; it is the server's while the request is served. At the cap, a new
    connection closes the one that has waited longest; when every connection is being served,
    the new one is refused (503).

    A long-poll, once its request is complete, is parked: it counts against `long_poll_cap`
    instead of `cap`, and is never closed for another connection. Past `long_poll_cap` a
    long-poll is served like any request.

    Crowded (three quarters of `cap` open), requests are no longer put off (`RequestHold`): a
    connection whose request is put off is not one that may be closed for a new one, and a
    fan-out to more agents than the cap would have its last pulls refused while the first
    agents' events wait; each of `on_crowded` is called as a connection makes it so (the
    request hold's release, a task server's work cache's). Crowded, an answer closes its
    connection (`LimitedHttpProtocol.serve`, but for the paths it keeps), and `room` closes those
    waiting `CROWDED_IDLE_S` or longer: a task server tickles no more agents while there is no
    room (`tickling.Tickler.gate_window`), so a fan-out to more agents than the cap has them wait
    for their tickle, not for a 503 and its Retry-After (issue 10: 5,000 agents of one task server
    at the cap of 4,096 were sent 1,350 503s and had 2,332 connections closed for others, their
    pulls served at ~300 a second, against ~3,600 at a cap of 12,000).
    """

    def __init__(
        self, cap: int, long_poll_cap: int = 0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.cap = cap
        self.long_poll_cap = long_poll_cap
        self.crowd = cap - cap // 4
        self.on_crowded: list[Callable[[], None]] = []
        self._clock = clock
        self._waiting: dict[TableMember, float] = {}  # since when, longest waiting first
        self._served: set[TableMember] = set()
        self._parked: set[TableMember] = set()

    @property
    def parked(self) -> int:
        """How many long-polls wait (beside the `len` connections)."""
        return len(self._parked)

    def __len__(self) -> int:
        return len(self._waiting) + len(self._served)

    def admit(self, conn: TableMember) -> bool:
        """Take a new connection, closing the longest waiting one at the cap; False: refuse it."""
        if len(self) >= self.cap and not self._close_longest_waiting(math.inf):
            return False
        self._waiting[conn] = self._clock()
        if len(self) >= self.crowd:
            for call in self.on_crowded:
                call()
        return True

    def crowded(self) -> bool:
        """Whether three quarters of the cap are open (see the class's doc)."""
        return len(self) >= self.crowd

    def room(self, coming: int = 0) -> bool:
        """Whether there is room below the crowd for one more connection beside `coming` ones
        (to be opened: agents tickled, their pulls due): if not, the connections waiting on
        their client `CROWDED_IDLE_S` or longer are closed (longest waiting first) until there
        is, or none is left."""
        if len(self) + coming < self.crowd:
            return True
        idle_since = self._clock() - CROWDED_IDLE_S
        while len(self) + coming >= self.crowd and self._close_longest_waiting(idle_since):
            pass
        return len(self) + coming < self.crowd

    def _close_longest_waiting(self, since: float) -> bool:
        """Close the connection waiting longest on its client if it has waited since `since` (or
        earlier); whether one was closed."""
        oldest = next(iter(self._waiting.items()), None)
        if oldest is None or oldest[1] > since:
            return False
        self.discard(oldest[0])
        oldest[0].evict()
        return True

    def served(self, conn: TableMember) -> None:
        """`conn`'s request is complete: the server's turn, not to be closed for another."""
        if conn in self._waiting:
            del self._waiting[conn]
            self._served.add(conn)

    def park(self, conn: TableMember) -> None:
        """`conn`'s request is a complete long-poll: parked while there is room, else served."""
        if conn in self._waiting and len(self._parked) < self.long_poll_cap:
            del self._waiting[conn]
            self._parked.add(conn)
        else:
            self.served(conn)

    def waiting(self, conn: TableMember) -> None:
        """`conn` was answered and waits for its next request: behind every other one."""
        if conn in self._served or conn in self._waiting or conn in self._parked:
            self.discard(conn)
            self._waiting[conn] = self._clock()

    def discard(self, conn: TableMember) -> None:
        self._waiting.pop(conn, None)
        self._served.discard(conn)
        self._parked.discard(conn)


# crowded (`ConnectionTable.room`), a connection waiting on its client this long is closed to make
# room: an agent posts its events within milliseconds of its pull, so one idle this long is done
CROWDED_IDLE_S = 0.1

# requests put off that a release serves in one turn of the event loop, the rest in the next
# turns: a task server's 2,500 agents' event posts, served in one, held its loop (and the pulls
# still coming) while each was read and its events queued
SERVE_PER_TURN = 256


class RequestHold:
    """Requests put off for a spell: on a connection that has just answered a request for one of
    `first`, while `busy()`, the next request, if for one of `later`, is read but not served
    until `settled(bound_s)` returns (it returns when the spell ends, or `bound_s` after it was
    called, at the first request put off).

    A task server's fan-out is such a spell (tickled agents' pulls due): an agent that has its
    tasks posts their status events next, on the same connection, and those wait for the other
    agents' pulls (issue 10, S5). Only the next request after a `first` one, and only one for
    `later`: a connection shared by several clients (a proxy's) has the others' pulls served at
    once. `bound_s` stays below the server's keep-alive (`SERVER_KEEPALIVE_S`).
    """

    def __init__(
        self,
        first: Collection[str],
        later: Collection[str],
        busy: Callable[[], bool],
        settled: Callable[[float], Awaitable[None]],
        bound_s: float,
    ) -> None:
        if bound_s >= SERVER_KEEPALIVE_S:
            raise ValueError(f"a request hold of {bound_s} s would outlast the keep-alive")
        self.first = frozenset(first)
        self.later = frozenset(later)
        self._busy = busy
        self._settled = settled
        self._bound_s = bound_s
        self._held: list[Callable[[], None]] = []  # each serves a request put off
        self._releasing: asyncio.Task[None] | None = None
        # whether the server's connections are crowded (`ConnectionTable.crowded`): then
        # nothing is put off
        self.crowded: Callable[[], bool] = lambda: False

    @property
    def held(self) -> int:
        """How many requests are put off now."""
        return len(self._held)

    def answered(self, path: str) -> bool:
        """A connection answered a request for `path`: whether its next one may be put off."""
        return path in self.first and self._busy() and not self.crowded()

    def still_busy(self, path: str) -> bool:
        """Whether the next request on a connection, for `path`, is put off (`answered` said it
        may be)."""
        return path in self.later and self._busy() and not self.crowded()

    def release_now(self) -> None:
        """Serve what is put off (soon: not within the caller's own callback), the spell or
        not: the connections are crowded."""
        if self._held:
            asyncio.get_running_loop().call_soon(self._serve_all)

    def _serve_all(self) -> None:
        held, self._held = self._held, []
        self._serve(held)

    def _serve(self, held: list[Callable[[], None]]) -> None:
        """Serve `held`, SERVE_PER_TURN in each turn of the event loop (what else is ready is
        served between); a request put off meanwhile waits for its own release."""
        now, rest = held[:SERVE_PER_TURN], held[SERVE_PER_TURN:]
        for release in now:
            release()
        if rest:
            asyncio.get_running_loop().call_soon(self._serve, rest)

    def hold(self, release: Callable[[], None]) -> None:
        """Put off a request read elsewhere (`tickle.front`): `release()` serves it."""
        self._held.append(release)
        if self._releasing is None:
            self._releasing = asyncio.get_running_loop().create_task(self._release())

    def puts_off(
        self, conn: LimitedHttpProtocol, cycle: RequestResponseCycle, app: ASGIApp
    ) -> bool:
        """Whether `cycle`'s request, about to be served on `conn`, is put off (served later)."""
        after_first, conn.after_first = conn.after_first, False
        if not after_first or not self.still_busy(cycle.scope["path"]):
            return False
        cycle.scope.setdefault("state", {}).setdefault(ARRIVED_AT, time.time())  # its clock's
        self.hold(functools.partial(_serve_held, conn, cycle, app))
        return True

    async def _release(self) -> None:
        try:
            await self._settled(self._bound_s)
        finally:
            self._releasing = None
            self._serve_all()


def _serve_held(conn: LimitedHttpProtocol, cycle: RequestResponseCycle, app: ASGIApp) -> None:
    if conn.cycle is cycle and not cycle.disconnected:
        conn.serve(cycle, app)


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with limits on the request head, deadlines, and the cap."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        assert isinstance(config, ServingConfig), "serve with ServingConfig"
        self.limits = config.limits
        self.metrics = config.metrics
        self.table = config.connections
        self.long_poll_paths = config.long_poll_paths
        # answered while crowded, kept alive all the same: the hold's first requests (an
        # agent's pull: its events follow on the connection) and long-polls (armed again on it)
        self.keep_when_crowded = config.long_poll_paths | (
            config.request_hold.first if config.request_hold is not None else frozenset()
        )
        self.head_bytes: int | None = 0  # received of the request head so far; None past it
        self.head_parsed = 0  # bytes of the request line and headers the parser gave us
        self.header_count = 0
        self.refusal: tuple[int, str, str] | None = None  # status, reason, detail
        self.deadline: asyncio.TimerHandle | None = None
        self.fast_lane = config.fast_lane
        self.request_hold = config.request_hold
        self.after_first = False  # answered one of `request_hold.first` (`RequestHold.answered`)
        # a request the fast path answers at once, read up to its body's end (none) first
        self.answer_at_end: tuple[RequestResponseCycle, tuple[ServeNow, frozenset[str]], Any] | None
        self.answer_at_end = None
        # handed over by a `tickle.front.AtOnceFront` with its next request: when that arrived
        # (put off there), and whether the fast path passed it on (not to be offered again)
        self.first_arrived_at: float | None = None
        self.first_passed_on = False

    # --- the connection -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.lingering_transport = LingeringTransport(transport, self)
        super().connection_made(self.lingering_transport)
        if not self.table.admit(self):
            self.refuse(503, "over_capacity", "the server has no room for another connection")
            return
        self._expect("head")

    def connection_lost(self, exc: Exception | None) -> None:
        self.table.discard(self)
        self._cancel_deadline()
        self.lingering_transport.stop_lingering()
        super().connection_lost(exc)
        self.lingering_transport.forget_protocol()  # no cycle left for the collector

    def eof_received(self) -> None:
        if self.lingering_transport.is_lingering:  # the client has sent all it will: done
            self.lingering_transport.stop_lingering()

    def evict(self) -> None:
        """Close this connection, waiting on its client, to make room for a new one."""
        self.metrics.http_refused.labels(reason="evicted").inc()
        self._cancel_deadline()
        self.lingering_transport.close_now()

    def client_is_sending(self) -> bool:
        """Whether the client is in the middle of a request (its head or its body)."""
        return self.head_bytes is None or self.head_bytes > 0

    def data_received(self, data: bytes) -> None:
        if self.lingering_transport.is_lingering:
            return  # the rest of a request already answered: read only to be dropped
        if self.head_bytes is not None:
            self.head_bytes += len(data)
            if self.deadline is None:  # the first bytes of a request after a kept-alive one
                self._expect("head")
        super().data_received(data)
        if self.refusal is not None:
            self.refuse(*self.refusal)
        elif self.head_bytes is not None and self.head_bytes > self.limits.max_header_bytes:
            # a head not complete yet (the parser holds it): checked after parsing, so that the
            # body in the same read is not counted as head
            self.refuse(431, "head_too_large", self._head_too_large())

    def _head_too_large(self) -> str:
        return f"request line and headers over the {self.limits.max_header_bytes}-byte limit"

    # --- parser callbacks (httptools) ----------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.refusal is None:
            # a request read with the end of one answered at once (`answer_now`), which armed
            # the keep-alive timeout: it is not idle
            self._unset_keepalive_if_required()
            super().on_message_begin()
            self.head_parsed = 0
            self.header_count = 0

    def on_url(self, url: bytes) -> None:
        if self.refusal is None and self._within_head_limits(len(url), headers=0):
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.refusal is None and self._within_head_limits(len(name) + len(value), headers=1):
            super().on_header(name, value)

    def _within_head_limits(self, size: int, headers: int) -> bool:
        """Count a part of the head; past a limit, refuse the request once the parser returns
        (until then every callback does nothing)."""
        self.head_parsed += size
        self.header_count += headers
        if self.head_parsed > self.limits.max_header_bytes:
            self.refusal = (431, "head_too_large", self._head_too_large())
        elif self.header_count > self.limits.max_headers:
            self.refusal = (
                431,
                "too_many_headers",
                f"more than {self.limits.max_headers} request headers",
            )
        return self.refusal is None

    def on_headers_complete(self) -> None:
        if self.refusal is not None:
            return
        self.head_bytes = None
        super().on_headers_complete()
        self._expect("body")

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        """Start serving a request, unless the `request_hold` puts it off."""
        if self.first_arrived_at is not None:
            cycle.scope["state"][ARRIVED_AT] = self.first_arrived_at
            self.first_arrived_at = None
        if self.first_passed_on:
            self.first_passed_on = False
            cast(Scope, cycle.scope)[PASSED_ON] = True
            super()._start_asgi_task(cycle, app)
            return
        if self.request_hold is not None and self.request_hold.puts_off(self, cycle, app):
            return
        self.serve(cycle, app)

    def serve(self, cycle: RequestResponseCycle, app: Any) -> None:
        """Serve a request: one of the app's fast path at the connection (`FastLane`); one it
        answers at once, as soon as it is read (`answer_now`)."""
        if self.table.crowded() and cycle.scope["path"] not in self.keep_when_crowded:
            cycle.keep_alive = False  # closed once answered: room for the agents still to come
        lane = self.fast_lane
        if lane is not None and app is self.app:
            now = lane.now_for(cycle)
            if now is not None:
                if cycle.more_body:  # its end (no body) is parsed next: answered then
                    self.answer_at_end = (cycle, now, app)
                else:
                    self.answer_now(cycle, now, app)
                return
            app = lane.app_for(cycle, app)
        super()._start_asgi_task(cycle, app)

    def answer_now(
        self, cycle: RequestResponseCycle, now: tuple[ServeNow, frozenset[str]], app: Any
    ) -> None:
        """Answer a request the fast path serves at once (`FastPath.served_now`): its answer
        written in one piece, without a task; one it passes on goes the whole way."""
        serve_now, parameters = now
        scope = cast(Scope, cycle.scope)
        scope["state"].setdefault(ARRIVED_AT, time.time())  # put off: when it was
        try:
            body = serve_now(Parts(scope, parameters), scope)
        except PassOn:
            scope[PASSED_ON] = True
            super()._start_asgi_task(cycle, app)
            return
        except Exception:  # as uvicorn answers an app's error: 500, and the connection closed
            log.exception("Exception in the fast path serving %s", scope["path"])
            cycle.keep_alive = False
            body, headers, status = b"Internal Server Error", _TEXT_HEADERS, 500
        else:
            headers, status = _JSON_HEADERS, 200
        if cycle.disconnected:
            return
        whole = [(b"content-length", str(len(body)).encode()), *headers]
        if not write_answer(cycle, status, whole, body):  # the server's own headers forbid it
            task = self.loop.create_task(_send_answer(cycle, status, whole, body))
            task.add_done_callback(self.tasks.discard)
            self.tasks.add(task)

    def on_body(self, body: bytes) -> None:
        if self.refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self.refusal is not None:
            return
        super().on_message_complete()
        self._cancel_deadline()
        self.head_bytes = 0  # the next request starts here
        at_end, self.answer_at_end = self.answer_at_end, None
        if at_end is not None and at_end[0] is self.cycle:
            self.answer_now(*at_end)
        if not self.cycle.response_complete:
            if self.scope.get("path") in self.long_poll_paths:
                self.table.park(self)
            else:
                self.table.served(self)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle.response_complete:
            self.table.waiting(self)  # kept alive for the next request
            if self.request_hold is not None:
                self.after_first = self.request_hold.answered(self.cycle.scope["path"])

    def send_400_response(self, msg: str) -> None:
        if self.refusal is not None:
            self.refuse(*self.refusal)
        else:
            super().send_400_response(msg)

    # --- refusals ------------------------------------------------------------------------------

    def refuse(self, status: int, reason: str, detail: str) -> None:
        """Answer `status` with a JSON detail when no answer has begun, and close."""
        if self.transport.is_closing():
            return
        self.metrics.http_refused.labels(reason=reason).inc()
        self._cancel_deadline()
        if self._may_answer():
            self.transport.write(refusal_response(status, detail))
        self.transport.close()

    def _may_answer(self) -> bool:
        if self.head_bytes is not None:  # in a head: the last cycle, if any, was an earlier one
            return self.cycle is None or self.cycle.response_complete
        return not self.cycle.response_started

    def _expect(self, part: str) -> None:
        """Start the deadline for the request's head or body."""
        self._cancel_deadline()
        seconds = (
            self.limits.request_head_timeout_s
            if part == "head"
            else self.limits.request_body_timeout_s
        )
        self.deadline = self.loop.call_later(seconds, self._too_slow, part, seconds)

    def _too_slow(self, part: str, seconds: float) -> None:
        self.deadline = None
        self.refuse(408, f"{part}_timeout", f"request {part} not received within {seconds:g} s")
        self.lingering_transport.close_now()  # a client this slow is not worth waiting for

    def _cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None


class LingeringTransport(asyncio.Transport):
    """The connection's transport, which closes gently while the client is still sending.

    A connection closed with unread data is reset, and the reset can overtake the answer in the
    client: a client still sending a body too large, or a head too long, would see a broken
    connection instead of its 413 or 431. So the close ends the sending side, drops what still
    arrives, and closes for good when the client closes or after `LINGER_S`.
    """

    def __init__(self, transport: asyncio.Transport, protocol: LimitedHttpProtocol) -> None:
        super().__init__()
        self._transport = transport
        self._protocol: LimitedHttpProtocol | None = protocol
        self._timer: asyncio.TimerHandle | None = None
        self.is_lingering = False

    def close(self) -> None:
        if self.is_lingering or self._transport.is_closing():
            return
        protocol = self._protocol
        if protocol is None or not (
            protocol.client_is_sending() and self._transport.can_write_eof()
        ):
            self._transport.close()
            return
        self.is_lingering = True
        self._transport.write_eof()
        self._transport.resume_reading()
        self._timer = asyncio.get_running_loop().call_later(LINGER_S, self.stop_lingering)

    def close_now(self) -> None:
        """Close without lingering."""
        self.stop_lingering()
        self._transport.close()

    def stop_lingering(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.is_lingering:
            self.is_lingering = False
            self._transport.close()

    def is_closing(self) -> bool:
        return self.is_lingering or self._transport.is_closing()

    def forget_protocol(self) -> None:
        """The connection is lost: let go of its protocol, which holds this transport (the two
        would otherwise wait for the cyclic garbage collector; see `settle_gc`)."""
        self._protocol = None

    # the rest as the transport itself does it

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        if not self.is_lingering:
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def write(self, data: bytes | bytearray | memoryview[int]) -> None:
        self._transport.write(data)

    def write_eof(self) -> None:
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def abort(self) -> None:
        self.stop_lingering()
        self._transport.abort()


_PHRASES = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


class JsonRoute(APIRoute):
    """A route of the NS and the task servers: its JSON body read by pydantic-core's parser, its
    plain-function endpoint and dependencies run on the route threads.

    JSON: for event batches the standard library's parser was a tenth of the NS's ingest, this
    one takes a third of that. A body that is not JSON gets the standard library's error, as
    FastAPI answers it (422, JSON decode error); JSON whose strings are not Unicode (a lone
    surrogate escape) gets pydantic-core's, also a 422. A body that is one pydantic model is
    validated straight from its JSON (FastAPI takes the model as it is): parsing it to Python
    objects and validating those cost twice as much (a batch of 500 status events: 2.2 ms
    against 1.0); a body the model refuses is parsed as above, so FastAPI answers its errors.

    Threads: FastAPI runs a plain function through starlette's threadpool (anyio), and for a
    plain endpoint validates its answer there too: three or four trips between the event loop
    and a thread per request, each a lock handoff under the GIL. Here the endpoint and each
    plain dependency become coroutines that call it on `route_threads()` (one trip each), and the
    answer is validated on the event loop, as for a coroutine endpoint. A test overriding a
    plain dependency (`app.dependency_overrides`) must override `threaded(dependency)`.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, threaded(endpoint), **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        model = _body_model(self)

        async def handle(request: Request) -> Response:
            json_request = _JsonRequest(request.scope, request.receive)
            json_request.body_model = model
            return await handler(json_request)

        return handle


def _body_model(route: APIRoute) -> type[pydantic.BaseModel] | None:
    """The pydantic model that is the route's whole JSON body, if it has one."""
    field = route.body_field
    if (
        field is None
        or len(route.dependant.body_params) != 1
        or isinstance(field.field_info, params.Form)
        or getattr(field.field_info, "embed", False)
    ):
        return None
    kind = field.field_info.annotation
    return kind if isinstance(kind, type) and issubclass(kind, pydantic.BaseModel) else None


# as many as starlette's threadpool has (anyio's default): a plain endpoint waiting on the
# database holds one
ROUTE_THREADS = 40
_route_threads: list[concurrent.futures.ThreadPoolExecutor] = []


def route_threads() -> concurrent.futures.ThreadPoolExecutor:
    """The threads the plain endpoints and dependencies of `JsonRoute`s run on (made on first
    use, one set per process)."""
    if not _route_threads:
        _route_threads.append(
            concurrent.futures.ThreadPoolExecutor(ROUTE_THREADS, thread_name_prefix="tickle-route")
        )
    return _route_threads[0]


async def on_route_thread(call: Callable[..., T], *args: Any) -> T:
    """`call(*args)` on `route_threads()`, in a copy of the caller's context: one trip to a
    thread (starlette's `run_in_threadpool` adds anyio's limiter and a handoff or two)."""
    run = functools.partial(contextvars.copy_context().run, call, *args)
    return await asyncio.get_running_loop().run_in_executor(route_threads(), run)


@functools.cache
def threaded(call: Callable[..., Any]) -> Callable[..., Any]:
    """`call` as FastAPI should call it on a `JsonRoute`: a plain function becomes a coroutine
    function running it on `route_threads()` (in a copy of the caller's context, as starlette
    does), with the same signature but for its plain dependencies, `threaded` in turn. Anything
    else (a coroutine or generator function, a class, a callable object) is `call` itself.

    One wrapper per function, so that FastAPI still calls a dependency once per request."""
    if not inspect.isfunction(call) or (
        inspect.iscoroutinefunction(call)
        or inspect.isgeneratorfunction(call)
        or inspect.isasyncgenfunction(call)
    ):
        return call
    try:
        signature = inspect.signature(call, eval_str=True)
    except NameError:  # an annotation only for the type checker: left to FastAPI as it is
        return call

    async def on_thread(*args: Any, **kwargs: Any) -> Any:
        return await on_route_thread(functools.partial(call, *args, **kwargs))

    functools.update_wrapper(on_thread, call)
    on_thread.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[_threaded_dependencies(p) for p in signature.parameters.values()]
    )
    return on_thread


def _threaded_dependencies(param: inspect.Parameter) -> inspect.Parameter:
    """`param`, its dependency (`Depends(f)` as default or in `Annotated`) `threaded`."""
    if isinstance(param.default, params.Depends):
        param = param.replace(default=_threaded_depends(param.default))
    if get_origin(param.annotation) is Annotated:
        kind, *metadata = get_args(param.annotation)
        metadata = [_threaded_depends(m) if isinstance(m, params.Depends) else m for m in metadata]
        param = param.replace(annotation=Annotated[(kind, *metadata)])
    return param


def _threaded_depends(depends: params.Depends) -> params.Depends:
    if depends.dependency is None:  # the annotated class itself: left to FastAPI
        return depends
    dependency = threaded(depends.dependency)
    if dependency is depends.dependency:
        return depends
    return dataclasses.replace(depends, dependency=dependency)


class _JsonRequest(Request):
    body_model: type[pydantic.BaseModel] | None = None

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if self.body_model is not None:
                try:
                    self._json = self.body_model.model_validate_json(body)
                    return self._json
                except pydantic.ValidationError:
                    pass  # parsed below: FastAPI validates it again and answers its errors
            try:
                self._json = pydantic_core.from_json(body)
            except ValueError as exc:
                json.loads(body)  # not JSON: its error, as FastAPI answers it (422)
                # JSON the standard library reads but pydantic-core refuses: a lone surrogate
                # (`"\\ud800"`), no Unicode character, which could be neither stored nor
                # echoed in UTF-8 (it was a 500)
                reason = f"{exc} (strings must be Unicode text: no lone \\ud800-\\udfff escape)"
                raise json.JSONDecodeError(reason, body.decode("utf-8", "replace"), 0) from None
        return self._json


def refusal_response(status: int, detail: str) -> bytes:
    """The whole answer of a refusal the server writes itself (before or instead of the app):
    a JSON detail, the connection closed; a 503 says when to try again (Retry-After)."""
    body = json.dumps({"detail": detail}).encode()
    retry = b"retry-after: %d\r\n" % RETRY_AFTER_S if status == 503 else b""
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"%sconnection: close\r\n\r\n%s" % (status, _PHRASES[status], len(body), retry, body)
    )


class BodyLimits:
    """ASGI middleware: a request body over its limit is refused (413) before it is read.

    The limit is `max_registration_body_bytes` for the `registrations` paths and for a request
    without credentials, and `max_body_bytes` for one whose bearer token `known_token` accepts;
    the token is checked only when a body outgrows the small limit, and one it does not accept
    gets 401, as the route would answer (a peer whose token was forgotten registers again). A
    declared Content-Length is judged before anything is read; a streamed body is counted as it
    comes, and stopped at its limit.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limits: ApiServerSettings,
        metrics: ComponentMetrics,
        registrations: Collection[str],
        known_token: TokenCheck,
    ) -> None:
        self.app = app
        self.limits = limits
        self.metrics = metrics
        self.registrations = frozenset(registrations)
        self.known_token = known_token
        self.small = limits.max_registration_body_bytes  # what any request may send

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared, streamed = _body_framing(scope)
        if not streamed and (declared is None or declared <= self.small):
            # no body, or one the parser stops at its declared length: within every limit
            await self.app(scope, receive, send)
            return
        allowance = _Allowance(self, scope)
        refused = await allowance.refusal(declared) if declared is not None else None
        if refused is not None:
            await self._refuse(send, *refused)
            return
        if not streamed:  # a declared length within the limit: the body cannot outgrow it
            await self.app(scope, receive, send)
            return
        received = 0
        answered = False

        async def receive_within_limit() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                refused = await allowance.refusal(received)
                if refused is not None:
                    raise _BodyTooLarge
            return message

        async def send_unless_refused(message: Message) -> None:
            nonlocal answered
            if refused is not None:
                return  # the app's answer to a body it did not get: ours goes instead
            answered = True
            await send(message)

        try:
            await self.app(scope, receive_within_limit, send_unless_refused)
        except Exception:
            if refused is None:
                raise
        if refused is not None and not answered:
            await self._refuse(send, *refused)

    async def _refuse(self, send: Send, status: int, detail: str) -> None:
        self.metrics.http_refused.labels(reason="body_too_large").inc()
        body = json.dumps({"detail": detail}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"connection", b"close"),  # the rest of the body is not read
        ]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    """Raised into the app by `receive` when a streamed body passes its limit."""


class _Allowance:
    """How large one request's body may be: small until its credentials are known to be valid."""

    def __init__(self, middleware: BodyLimits, scope: Scope) -> None:
        self._known_token = middleware.known_token
        self._scope = scope
        self._small = middleware.limits.max_registration_body_bytes
        self._large = middleware.limits.max_body_bytes
        self._registration = scope["path"] in middleware.registrations
        self._token = _bearer_token(scope)
        self.bytes = self._small

    async def refusal(self, size: int) -> tuple[int, str] | None:
        """None when a body of `size` bytes may be read, else the status and why."""
        if size <= self.bytes:
            return None
        if self._registration:
            return 413, f"request body over the {self._small}-byte limit of registrations"
        if size > self._large:
            return 413, f"request body over the {self._large}-byte limit"
        if self._token is None:
            return 413, f"request body over the {self._small}-byte limit without credentials"
        token, self._token = self._token, None  # checked once
        if not await self._known_token(token, self._scope):
            return 401, f"unknown bearer token (a body over {self._small} bytes needs a valid one)"
        self.bytes = self._large
        return None


def _body_framing(scope: Scope) -> tuple[int | None, bool]:
    """The request's declared body length (Content-Length), and whether its body is streamed
    without one (Transfer-Encoding): the parser refuses a request with both."""
    declared: int | None = None
    streamed = False
    for name, value in scope["headers"]:
        if name == b"content-length" and declared is None:
            with contextlib.suppress(ValueError):
                declared = int(value)
        elif name == b"transfer-encoding":
            streamed = True
    return declared, streamed


def _proxied(scope: Scope) -> bool:
    """Whether the request bears a header uvicorn's proxy-headers middleware reads."""
    return any(name in _PROXY_HEADERS for name, _ in scope["headers"])


def _bearer_token(scope: Scope) -> str | None:
    value: bytes
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


# request state: when the request arrived (`time.time()`), set by `ClockHeaders`
ARRIVED_AT = "tickle_arrived_at"
_TIME_HEADER = TIME_HEADER.lower().encode()


class ClockHeaders:
    """Notes each request's arrival in its state (`ARRIVED_AT`) and answers with our time.

    The arrival, taken before the body is read, is what a peer's `X-Tickle-Time` is compared
    with; the time on the answer lets the peer measure its own offset from us.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # a request put off (`RequestHold`) arrived when it was put off
        scope.setdefault("state", {}).setdefault(ARRIVED_AT, time.time())

        async def send_with_time(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), _time_header()]
            await send(message)

        await self.app(scope, receive, send_with_time)


# the middleware FastAPI puts before an app's own: nothing a fast path's request needs of them
# (an error is answered 500 by uvicorn's cycle; FastAPI's native OpenTelemetry, which nothing
# here configures, sees none of the lane's requests; a body limit of FastAPI's own would be
# another node, `RequestBodyLimitMiddleware`, and keep the lane off)
_PASSIVE_MIDDLEWARE = frozenset(
    {"ServerErrorMiddleware", "ExceptionTelemetryMiddleware", "AppBodyLimitMiddleware"}
)
# what uvicorn's proxy-headers middleware reads: a request bearing one goes the whole way
_PROXY_HEADERS = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"forwarded"})
# a request's body framing (`_body_framing`) when it has none
_NO_BODY = ((None, False), (0, False))
_JSON_HEADERS = ((b"content-type", b"application/json"),)
_TEXT_HEADERS = ((b"content-type", b"text/plain; charset=utf-8"),)


class FastLane:
    """An app's fast path served at the connection: its requests skip the ASGI middleware.

    Every agent's pull and event post, every task server's work pull and event batch went
    through uvicorn's proxy-headers middleware, FastAPI's own (errors, telemetry, body limit),
    `ClockHeaders` and `BodyLimits` before the `FastPath` answered them, and their answer back
    through each (a task server's CPU per request 138 → 99 µs kept alive, issue 10). The lane
    hands such a request straight to the fast path's server, doing itself what those did
    for it: the arrival noted (`ARRIVED_AT`) and our time on the answer (`ClockHeaders`), the
    body within its limit (`BodyLimits`: a request whose body it cannot judge before reading
    goes the whole way; the server checks the bearer token before it reads one over the small
    limit), and the answer written in one piece. What the fast path passes on goes the whole
    way, its body handed on, and is not offered to the fast path again (`PASSED_ON`).

    Only for an app whose middleware down to its `FastPath` is FastAPI's own, `ClockHeaders`
    and `BodyLimits` (`of`): any other middleware sees every request.
    """

    def __init__(self, fast_path: FastPath, body_limits: BodyLimits) -> None:
        self.served = fast_path.served
        self.served_now = fast_path.served_now
        self.small = body_limits.small
        self.large = body_limits.limits.max_body_bytes
        self.registrations = body_limits.registrations

    @classmethod
    def of(cls, app: ASGIApp) -> FastLane | None:
        """The lane of `app`'s fast path; None when it has none, or other middleware."""
        node: Any = app
        if isinstance(app, Starlette):
            if app.middleware_stack is None:  # built as the first request would build it
                app.middleware_stack = app.build_middleware_stack()
            node = app.middleware_stack
        clock: ClockHeaders | None = None
        limits: BodyLimits | None = None
        for _ in range(32):
            if isinstance(node, FastPath):
                return cls(node, limits) if clock is not None and limits is not None else None
            if isinstance(node, ClockHeaders):
                clock = node
            elif isinstance(node, BodyLimits):
                limits = node
            elif type(node).__name__ not in _PASSIVE_MIDDLEWARE:
                return None
            node = getattr(node, "app", None)
        return None

    def app_for(self, cycle: RequestResponseCycle, app: ASGIApp) -> ASGIApp:
        """What serves `cycle`'s request: the fast path's server when it is one of its requests
        and its body can be judged now, else `app` (the whole way)."""
        scope = cast(Scope, cycle.scope)
        served = self.served.get((scope["method"], scope["path"]))
        if served is None or not self._judged(scope):
            return app
        return _Lane(served, app, cycle)

    def now_for(self, cycle: RequestResponseCycle) -> tuple[ServeNow, frozenset[str]] | None:
        """The fast path's server of `cycle`'s request when it answers it at once: one of its
        `served_now`, without a body (none declared, none streamed) and with no proxy header."""
        scope = cast(Scope, cycle.scope)
        now = self.served_now.get((scope["method"], scope["path"]))
        if now is None or _body_framing(scope) not in _NO_BODY or _proxied(scope):
            return None
        return now

    def _judged(self, scope: Scope) -> bool:
        """Whether the request's body is within its limit as far as `BodyLimits` would judge it
        before reading (a larger one: if its token is good, which the server checks first)."""
        declared, streamed = _body_framing(scope)
        if streamed or _proxied(scope):
            return False
        if declared is None or declared <= self.small:
            return True
        return (
            declared <= self.large
            and scope["path"] not in self.registrations
            and _bearer_token(scope) is not None
        )


class _Lane:
    """One request on the lane: served by the fast path, or passed on the whole way."""

    __slots__ = ("app", "cycle", "parameters", "serve")

    def __init__(
        self, served: tuple[Serve, frozenset[str]], app: ASGIApp, cycle: RequestResponseCycle
    ) -> None:
        self.serve, self.parameters = served
        self.app = app
        self.cycle = cycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"].setdefault(ARRIVED_AT, time.time())  # put off: when it was
        replay = Replay(receive)
        try:
            await self.serve(
                Parts(scope, self.parameters), scope, replay, _Answer(self.cycle, send)
            )
            return
        except PassOn:
            pass
        scope[PASSED_ON] = True
        await self.app(scope, replay, send)


class _Answer:
    """A fast path's answer, written as one piece with our time on it (`ClockHeaders`'s); one
    streamed, or without its length, goes through uvicorn's cycle (`send`)."""

    __slots__ = ("cycle", "send", "start")

    def __init__(self, cycle: RequestResponseCycle, send: Send) -> None:
        self.cycle = cycle
        self.send = send
        self.start: Message | None = None

    async def __call__(self, message: Message) -> None:
        cycle = self.cycle
        if message["type"] == "http.response.start" and self.start is None:
            self.start = message  # written with its body
            return
        start, self.start = self.start, None
        if start is not None and message["type"] == "http.response.body":
            if cycle.flow.write_paused and not cycle.disconnected:
                await cycle.flow.drain()
            if cycle.disconnected:
                return
            if not message.get("more_body", False) and self._write(start, message):
                return
        if start is not None:
            await self.send({**start, "headers": [*start.get("headers", ()), _time_header()]})
        await self.send(message)

    def _write(self, start: Message, message: Message) -> bool:
        """Write the whole answer; False (nothing written) unless its length is declared and
        true, and it says nothing of the connection."""
        return write_answer(
            self.cycle, start["status"], start.get("headers", ()), message.get("body", b"")
        )


def write_answer(
    cycle: RequestResponseCycle,
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
) -> bool:
    """Write `cycle`'s whole answer, with our time on it (`ClockHeaders`'s), and end the cycle
    as uvicorn's would; False (nothing written) unless the length in `headers` is declared and
    true, and they say nothing of the connection."""
    answer = answer_bytes(cycle.default_headers, status, headers, body, cycle.keep_alive)
    if answer is None:
        return False
    cycle.response_started = cycle.response_complete = True
    cycle.waiting_for_100_continue = False
    cycle.transport.write(answer)
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()
    return True


def answer_bytes(
    default_headers: Iterable[tuple[bytes, bytes]],
    status: int,
    headers: Iterable[tuple[bytes, bytes]],
    body: bytes,
    keep_alive: bool,
) -> bytes | None:
    """A whole answer as written on the connection: the server's `default_headers`, `headers`,
    our time (`ClockHeaders`'s), `connection: close` unless `keep_alive`; None unless the
    length in `headers` is declared and true, and they say nothing of the connection."""
    head = [STATUS_LINE[status]]
    length = -1
    for name, value in [*default_headers, *headers, _time_header()]:
        if name == b"content-length":
            length = int(value)
        elif name in (b"connection", b"transfer-encoding"):
            return None
        head += (name, b": ", value, b"\r\n")
    if length != len(body):
        return None
    if not keep_alive:
        head.append(b"connection: close\r\n")
    head += (b"\r\n", body)
    return b"".join(head)


async def _send_answer(
    cycle: RequestResponseCycle, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """Send an answer through uvicorn's cycle, with our time on it (`write_answer` could not)."""
    await cycle.send(
        {"type": "http.response.start", "status": status, "headers": [*headers, _time_header()]}
    )
    await cycle.send({"type": "http.response.body", "body": body})


def _time_header() -> tuple[bytes, bytes]:
    """Our time, as every answer carries it (`X-Tickle-Time`)."""
    return _TIME_HEADER, header_value(time.time()).encode()


def arrived_at(state: Any) -> float:
    """When the request whose `request.state` this is arrived (now, without `ClockHeaders`)."""
    at = getattr(state, ARRIVED_AT, None)
    return at if isinstance(at, float) else time.time()


def run_server(main: Coroutine[Any, Any, T]) -> T:
    """Run a server's `main` to its end on uvloop, the event loop uvicorn itself would pick
    (asyncio's own where uvloop is not installed)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# the cyclic garbage collector's thresholds once started (Python's: 2,000, 10, 10): see settle_gc
GC_THRESHOLD = (50_000, 20, 10)


def settle_gc() -> None:
    """Once started: what start-up made (modules, the app, its schemas) is kept out of the cyclic
    garbage collector's passes, and a pass comes every `GC_THRESHOLD` new objects, not 2,000.

    A run-now on thousands of agents makes objects by the million (requests, events, tickle
    flights): with Python's defaults the collector took a third of the task server's CPU in S5
    and 7 % of the NS's in S2 (gc.callbacks), mostly full passes over everything start-up made.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


# while a burst lasts (`CollectorPause`), the collector's first generation waits for this many
# new objects, for this long at most; once it is over, the thresholds come back when the burst's
# objects are gone (looked at this often)
BURST_GC_THRESHOLD = 1_000_000
BURST_GC_MAX_S = 30.0
BURST_GC_CHECK_S = 0.25


class CollectorPause:
    """The cyclic garbage collector's passes put off while a burst lasts (a task server's
    fan-out: its tickled agents' pulls are due) and until what it made is gone.

    A fan-out's objects are its connections' (protocols, parsers, transports, timers: some 80
    an agent), alive while the agents pull and post their events and until their connections
    close, then freed by their reference counts (nothing a connection leaves holds a cycle:
    `LingeringTransport.forget_protocol`, `AtOnceFront`'s parser). A pass over them while they
    live finds nothing to free: at 2,500 agents four passes of the first generation took 117 ms
    of the fan-out's 0.8 s (gc.callbacks, S5), each over 50,000 objects alive, and the passes
    after it went over them again. So from the burst's start a pass waits for `threshold` new
    objects (a bound on what could pile up meanwhile); after its end the thresholds are as they
    were once the collector's count of new objects is below its first threshold again (every
    object it counted and freed counts off: no pass is due then), or `max_s` after the start.
    """

    def __init__(
        self,
        threshold: int = BURST_GC_THRESHOLD,
        max_s: float = BURST_GC_MAX_S,
        check_s: float = BURST_GC_CHECK_S,
        young: Callable[[], int] = lambda: gc.get_count()[0],
    ) -> None:
        """`young`: the collector's count of new objects (what its first threshold is for)."""
        self.threshold = threshold
        self._young = young
        self.max_s = max_s
        self.check_s = check_s
        self._before: tuple[int, ...] | None = None  # the thresholds while paused
        self._busy = False
        self._deadline: asyncio.TimerHandle | None = None
        self._check: asyncio.TimerHandle | None = None

    @property
    def paused(self) -> bool:
        return self._before is not None

    def busy(self, on: bool) -> None:
        """A burst starts (True) or ends (False)."""
        self._busy = on
        if not on:
            if self._check is None:  # else a look is due already
                self._settled()
            return
        if self._before is not None or not gc.isenabled():
            return
        self._before = gc.get_threshold()
        gc.set_threshold(max(self.threshold, self._before[0]), *self._before[1:])
        self._deadline = asyncio.get_running_loop().call_later(self.max_s, self._resume)

    def _settled(self) -> None:
        """Resume if the burst's objects are gone; else look again in `check_s`."""
        self._check = None
        if self._before is None or self._busy:
            return
        if self._young() < self._before[0]:
            self._resume()
        else:
            self._check = asyncio.get_running_loop().call_later(self.check_s, self._settled)

    def _resume(self) -> None:
        for timer in (self._deadline, self._check):
            if timer is not None:
                timer.cancel()
        self._deadline = self._check = None
        if self._before is not None:
            gc.set_threshold(*self._before)
            self._before = None
