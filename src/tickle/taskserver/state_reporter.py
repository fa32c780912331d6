"""Tells the NS what the task server learned about its agents: their contacts (last contact,
settings version), tickle reachability, NAT.

Cheap on the hot path: an agent's contact (poll, pull, policy fetch, status event) is one dict
write here; the contacts are reported in batches every `contact_interval_s`, so 10,000 agents
cost the NS a few writes per interval, not one per pull. State changes (reachability, a new
address) are reported at once, and those that follow a report within `COALESCE_S` go together
after that (a run-now on a fleet turns its agents reachable one pull after another: one post each
would cost the NS a write per pull). Reports are merged per computer (the latest wins), posted
in order by one background worker in parts of at most `BATCH` computers, retried with backoff (full
jitter, after a busy NS's `Retry-After`: the task servers of a restarted NS come back spread; at
once when the NS answers another request, unless it said Retry-After), and dropped with a warning
after the last try. A task server's reports wait while its fan-out's pulls are due, and then
while its status events go to the NS (`quiet`: a run-now turns its agents reachable and
measures their clocks, first after a start: 2,500 reports in the pulls' midst, or before the
events the operator waits for). Computers the NS answers it does not know (forgotten
by the operator) are handed to `on_forgotten`, which drops their credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import aiohttp

from tickle.backoff import Backoff
from tickle.http import ApiError, retry_after_s
from tickle.messages import ComputerState, TickleState
from tickle.taskserver.ns_client import NsClient, UntilBack, ns_away

log = logging.getLogger(__name__)
BATCH = 1000  # computers per report
COALESCE_S = 0.25  # the changes that follow a report within this go in the next, together
# a report the NS did not take: tried again over a window drawn anew each time (full jitter)
RETRY = Backoff(base_s=1.0, max_s=30.0, tries=6, full_jitter=True)


class StateReporter:
    """Queues `ComputerState` reports and delivers them to the NS in the background."""

    def __init__(
        self,
        ns: NsClient,
        backoff: Backoff | None = None,
        contact_interval_s: float = 15.0,
        on_forgotten: Callable[[list[str]], None] | None = None,
        quiet: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`quiet`: awaited before each post (the task server's fan-out: its pulls first, its
        status events next)."""
        self._ns = ns
        self._quiet = quiet
        self._backoff = backoff or RETRY
        self._until_back = UntilBack(ns)  # a retry goes once the NS answered another request
        self._contact_interval_s = contact_interval_s
        self._on_forgotten = on_forgotten
        self._pending: dict[str, _Pending] = {}
        self._contacts: dict[str, tuple[float, int | None]] = {}  # name -> (at, settings version)
        self._tickle_states: dict[str, TickleState] = {}  # the last one told, per computer
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._flush())]

    def contact(self, name: str, settings_version: int | None = None) -> None:
        """Note that agent `name` contacted us now, having `settings_version` (None: unknown)."""
        if settings_version is None and name in self._contacts:
            settings_version = self._contacts[name][1]
        self._contacts[name] = (time.time(), settings_version)

    def report(self, state: ComputerState) -> None:
        """Queue a report; fields it leaves unset keep the value of an earlier queued report."""
        self.note(
            state.name,
            state.at,
            tickle_state=state.tickle_state,
            observed_address=state.observed_address,
            clock_offset_s=state.clock_offset_s,
            contact_at=state.contact_at,
            settings_version=state.settings_version,
        )

    def note(
        self,
        name: str,
        at: float,
        *,
        tickle_state: TickleState | None = None,
        observed_address: str | None = None,
        clock_offset_s: float | None = None,
        contact_at: float | None = None,
        settings_version: int | None = None,
    ) -> None:
        """`report` of what the task server itself holds valid (a client's stored name, a
        measured offset, a socket's address): merged into the computer's queued report as it
        is, a `ComputerState` made only when posted. A run-now's pulls turn each agent
        reachable, measure its clock and note its contact: pydantic models made and merged for
        each cost 15.2-15.9 µs an agent, ~6 % of the task server's CPU per pull in S5's fan-out,
        against 1.2-2.2 µs so (`make bench-micro`)."""
        pending = self._pending.get(name)
        if pending is None:
            self._pending[name] = _Pending(
                name, at, tickle_state, observed_address, clock_offset_s, contact_at,
                settings_version,
            )  # fmt: skip
        else:
            pending.at = at
            if tickle_state:
                pending.tickle_state = tickle_state
            if observed_address:
                pending.observed_address = observed_address
            if clock_offset_s is not None:
                pending.clock_offset_s = clock_offset_s
            if contact_at and (pending.contact_at is None or contact_at > pending.contact_at):
                pending.contact_at = contact_at
            if settings_version is not None:
                pending.settings_version = settings_version
        self._wake.set()

    def tickle_state(
        self, name: str, state: Literal["reachable", "unreachable", "clock_skewed"]
    ) -> None:
        """Report that computer `name` turned tickle-reachable or tickle-unreachable (or is
        unreachable because its clock is skewed)."""
        # unreachable is told every time (a new outage); reachable only when it changes
        if state == "reachable" and self._tickle_states.get(name) == state:
            return
        self._tickle_states[name] = state
        self.note(name, time.time(), tickle_state=state)

    def flush_contacts(self) -> None:
        """Queue the contacts noted since the last flush as one report."""
        contacts, self._contacts = self._contacts, {}
        for name, (at, version) in contacts.items():
            self.note(name, at, contact_at=at, settings_version=version)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _flush(self) -> None:
        while True:
            await asyncio.sleep(self._contact_interval_s)
            self.flush_contacts()

    async def _run(self) -> None:
        last_post = -COALESCE_S
        while True:
            await self._wake.wait()
            await asyncio.sleep(max(0.0, last_post + COALESCE_S - time.monotonic()))
            if self._quiet is not None:
                await self._quiet()
            last_post = time.monotonic()
            self._wake.clear()
            # what is pending now, in parts; what arrives meanwhile waits for the next round
            # (coalesced), not for the end of each post: a run-now turning a fleet reachable
            # pull after pull made one post per NS round trip (S5: ~260 posts of ~19 states)
            pending, self._pending = self._pending, {}
            names = list(pending)
            for at in range(0, len(names), BATCH):
                await self._deliver([pending[n].state() for n in names[at : at + BATCH]])

    async def _deliver(self, batch: list[ComputerState]) -> None:
        attempt = 0
        while True:
            try:
                forgotten = await self._ns.computer_states(batch)
                if forgotten and self._on_forgotten is not None:
                    log.info("computers forgotten at the NS: %s", ", ".join(forgotten))
                    self._on_forgotten(forgotten)
                return
            except ApiError as exc:
                if not ns_away(exc):  # refused however often sent
                    log.warning("the NS refused computer states %s: %s", _names(batch), exc)
                    return
                problem: Exception = exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = exc
            attempt += 1
            if self._backoff.tries is not None and attempt >= self._backoff.tries:
                log.warning("computer states %s not delivered: %s", _names(batch), problem)
                return
            delay = self._backoff.wait(attempt - 1, retry_after_s(problem))
            log.info("computer states not delivered (%s); retry in %.1fs", problem, delay)
            await self._until_back.wait(delay, problem)


def _names(batch: list[ComputerState]) -> str:
    names = [s.name for s in batch]
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


@dataclass(slots=True)
class _Pending:
    """A computer's queued report, merged in place (`StateReporter.note`)."""

    name: str
    at: float
    tickle_state: TickleState | None
    observed_address: str | None
    clock_offset_s: float | None
    contact_at: float | None
    settings_version: int | None

    def state(self) -> ComputerState:
        # every value valid where it came from (`note`): made without validating again
        return ComputerState.model_construct(
            name=self.name,
            tickle_state=self.tickle_state,
            observed_address=self.observed_address,
            clock_offset_s=self.clock_offset_s,
            at=self.at,
            contact_at=self.contact_at,
            settings_version=self.settings_version,
        )
