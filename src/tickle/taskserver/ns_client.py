"""The task server's client of the notification server API (aiohttp).

The task server registers once and keeps its credentials; it registers again only when the NS
answers 401 to the stored token (the NS lost or rotated them), then repeats the request once.
Every request carries our time and every answer the NS's (`X-Tickle-Time`): the NS measures our
clock, and `clock_offset_s` is our own measure of how far our clock is off the NS's.

The first answer after a request found the NS away (no answer, 5xx, 429) calls the `on_back`
callbacks: what waits out a retry delay for the NS (a state report, the event outbox, a work
pull) goes at once instead of seconds later, each on its own schedule (S6 of issue 10: after an
NS restart, a task server's last requests came 5-7 s after the NS answered its first).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pydantic_core
from pydantic import BaseModel

from tickle.clock import OffsetEstimator
from tickle.http import ApiError, client_session, request, retry_after_s
from tickle.messages import (
    AgentCredentials,
    AgentRegistration,
    ClientInfo,
    ComputerState,
    ComputerStatesAck,
    EventAck,
    EventBatch,
    SettingsOut,
    StatusEvent,
    TaskServerCredentials,
    TaskServerRegister,
    TsPullVia,
    WorkOut,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
REFUSED_FOR_GOOD = frozenset({403, 422})
# a batch over the NS's max_body_bytes: sent again in parts (one event always fits)
TOO_LARGE = 413
BUSY = 429  # the NS is busy: "not now", unlike the other 4xx
# posts the NS may get twice (it records status events by id, states are set, not added)
IDEMPOTENT_POSTS = frozenset({"/api/ts/events", "/api/ts/computers/state"})

Register = Callable[[], Awaitable[TaskServerCredentials]]


class NsClient:
    """Calls the NS routes under `/api/ts/` with this task server's token."""

    def __init__(self, ns_url: str, timeout_s: float = 10.0, ca_file: Path | None = None) -> None:
        self.ns_url = ns_url.rstrip("/")
        self._timeout_s = timeout_s
        self._ca_file = ca_file  # None: the system trust store; verification is never off
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None
        self._reregister: Register | None = None
        self._reregister_lock = asyncio.Lock()
        self._ns_clock = OffsetEstimator()  # samples of the NS's offset from us
        self._away = False  # a request found the NS away and none was answered since
        self._on_back: list[Callable[[], None]] = []

    @property
    def clock_offset_s(self) -> float | None:
        """How far our clock is ahead of the NS's (None: no answer measured yet)."""
        theirs = self._ns_clock.offset(self.ns_url)
        return None if theirs is None else -theirs

    def use_credentials(self, creds: TaskServerCredentials, reregister: Register) -> None:
        """Authenticate with `creds`; call `reregister` when the NS no longer knows them."""
        self._token = creds.token
        self._reregister = reregister

    def on_back(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever the NS answers again after a request found it away."""
        self._on_back.append(callback)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def register(self, body: TaskServerRegister) -> TaskServerCredentials:
        """Register this task server with the enrollment secret; the NS issues credentials."""
        creds: TaskServerCredentials = await request(
            self._http(), "POST", self._url("/api/ts/register"), body=body,
            answer=TaskServerCredentials,
        )  # fmt: skip
        self._token = creds.token
        return creds

    async def register_agent(self, body: AgentRegistration) -> AgentCredentials:
        creds: AgentCredentials = await self._call(
            "POST", "/api/ts/agents/register", body=body, answer=AgentCredentials
        )
        return creds

    async def clients(self) -> list[ClientInfo]:
        clients: list[ClientInfo] = await self._call(
            "GET", "/api/ts/clients", answer=list[ClientInfo]
        )
        return clients

    async def work(self, via: TsPullVia) -> WorkOut:
        """The pull: every unfinished execution of this task server's clients; `via="tickle"`
        acks the NS's tasks tickle."""
        work: WorkOut = await self._call("GET", "/api/ts/work", params={"via": via}, answer=WorkOut)
        return work

    async def settings(self, via: TsPullVia) -> SettingsOut:
        """The central settings; `via="tickle"` acks the NS's settings tickle."""
        settings: SettingsOut = await self._call(
            "GET", "/api/ts/settings", params={"via": via}, answer=SettingsOut
        )
        return settings

    async def events(self, batch: EventBatch | bytes) -> EventAck:
        """Post status events (an `EventBatch`, or one serialized already)."""
        ack: EventAck = await self._call("POST", "/api/ts/events", body=batch, answer=EventAck)
        return ack

    async def computer_states(self, states: list[ComputerState]) -> list[str]:
        """Report what we saw of our clients; the names the NS does not know (forgotten)."""
        ack = await self._call(
            "POST", "/api/ts/computers/state", body=states, answer=ComputerStatesAck
        )
        return list(ack.forgotten)

    async def send_events(self, bodies: list[str]) -> list[str]:
        """The outbox forwarder's send: post serialized status events, return the ids to drop.

        An event the NS refuses for good would block the outbox forever: a batch answered 403 or
        422 is split, and a single refused event is logged as an error and dropped; so is an
        event the NS leaves out of `accepted` (not this task server's to report: it never will).
        A batch too large for the NS (413) is split too.
        """
        # what the outbox holds was valid when queued (each an event's JSON): posted as it is,
        # not parsed and serialized again (that cost ~47 CPU-us per event on the loaded bench
        # machine, model_construct most of it; the join under 1)
        batch = b'{"events":[' + ",".join(bodies).encode() + b"]}"
        try:
            accepted = set((await self.events(batch)).accepted)
        except ApiError as exc:
            events = _parsed(bodies)
            if exc.status == TOO_LARGE and len(events) == 1:
                smaller = events[0].without_output()
                if smaller is not None:  # alone too large: its output goes, its status gets through
                    log.error("status event %s is over the NS's body limit: its output is"
                              " dropped", events[0].event_id)  # fmt: skip
                    return await self.send_events([smaller.model_dump_json()])
            too_large = exc.status == TOO_LARGE and len(events) > 1
            if exc.status not in REFUSED_FOR_GOOD and not too_large:
                raise
            if len(events) == 1:
                log.error("the NS refused status event %s for good: %s", events[0], exc)
                return [events[0].event_id]
            done: list[str] = []
            for body in bodies:
                done += await self.send_events([body])
            return done
        if len(accepted) == len(bodies):
            return list(accepted)
        events = _parsed(bodies)
        for e in events:
            if e.event_id not in accepted:
                log.error("the NS refused status event %s for good (not accepted): dropped", e)
        return [e.event_id for e in events]

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: BaseModel | list[ComputerState] | bytes | None = None,
        params: dict[str, str] | None = None,
        answer: Any = None,
    ) -> Any:
        used = self._token
        try:
            return await self._send(method, path, body, params, answer)
        except ApiError as exc:
            if exc.status != 401 or self._reregister is None:
                raise
        async with self._reregister_lock:
            if self._token == used:  # concurrent 401s register once
                log.warning("the NS rejected this task server's token; registering again")
                self._token = (await self._reregister()).token
        return await self._send(method, path, body, params, answer)

    async def _send(
        self, method: str, path: str, body: Any, params: dict[str, str] | None, answer: Any
    ) -> Any:
        try:
            result = await request(
                self._http(), method, self._url(path), body=body, params=params, answer=answer,
                token=self._token, idempotent=method == "GET" or path in IDEMPOTENT_POSTS,
            )  # fmt: skip
        except ApiError as exc:
            self._answered(not ns_away(exc))
            raise
        except (aiohttp.ClientError, TimeoutError):
            self._answered(False)
            raise
        self._answered(True)
        return result

    def _answered(self, answered: bool) -> None:
        if not answered:
            self._away = True
        elif self._away:
            self._away = False
            for callback in self._on_back:
                callback()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = client_session(
                timeout_s=self._timeout_s, ca_file=self._ca_file, on_offset=self._ns_offset_sample
            )
        return self._session

    def _ns_offset_sample(self, offset_s: float) -> None:
        self._ns_clock.add(self.ns_url, offset_s)

    def _url(self, path: str) -> str:
        return self.ns_url + path


class UntilBack:
    """A retry's wait that the NS's answering again cuts short (see `NsClient.on_back`), unless
    the NS said how long to wait (Retry-After: a busy NS is not asked again sooner)."""

    def __init__(self, ns: NsClient) -> None:
        self._back = asyncio.Event()
        ns.on_back(self._back.set)

    async def wait(self, delay: float, problem: BaseException) -> None:
        """Wait `delay` after `problem`; less if the NS answers again meanwhile."""
        if retry_after_s(problem):
            await asyncio.sleep(delay)
            return
        self._back.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._back.wait(), delay)


def ns_away(exc: BaseException) -> bool:
    """Whether a failed request found the NS away (no answer, 5xx) or busy (429), not
    answering: tried again later, and its wait cut short once the NS answers again (see
    `NsClient.on_back`) unless the NS said how long to wait (Retry-After)."""
    if isinstance(exc, ApiError):
        return exc.status >= 500 or exc.status == BUSY
    return isinstance(exc, aiohttp.ClientError | TimeoutError)


def _parsed(bodies: list[str]) -> list[StatusEvent]:
    """Events the outbox holds, read back (valid when queued: not validated again)."""
    return [StatusEvent.model_construct(**pydantic_core.from_json(b)) for b in bodies]
