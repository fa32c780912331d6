"""Tells the NS what the task server learned about its agents (tickle reachability, NAT).

Best effort but bounded: reports are merged per computer (the latest wins), posted in order by one
background worker, retried with backoff, and dropped with a warning after the last try.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Literal

import aiohttp

from tickle.backoff import Backoff
from tickle.http import ApiError
from tickle.messages import ComputerState, TickleState
from tickle.taskserver.ns_client import NsClient

log = logging.getLogger(__name__)


class StateReporter:
    """Queues `ComputerState` reports and delivers them to the NS in the background."""

    def __init__(self, ns: NsClient, backoff: Backoff | None = None) -> None:
        self._ns = ns
        self._backoff = backoff or Backoff(base_s=1.0, max_s=30.0, tries=6)
        self._pending: dict[str, ComputerState] = {}
        self._tickle_states: dict[str, TickleState] = {}  # the last one told, per computer
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def report(self, state: ComputerState) -> None:
        """Queue a report; fields it leaves unset keep the value of an earlier queued report."""
        old = self._pending.get(state.name)
        if old is not None:
            state = ComputerState(
                name=state.name,
                tickle_state=state.tickle_state or old.tickle_state,
                observed_address=state.observed_address or old.observed_address,
                clock_offset_s=(
                    old.clock_offset_s if state.clock_offset_s is None else state.clock_offset_s
                ),
                at=state.at,
            )
        self._pending[state.name] = state
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
        self.report(ComputerState(name=name, tickle_state=state, at=time.time()))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = list(self._pending.values())
                self._pending.clear()
                await self._deliver(batch)

    async def _deliver(self, batch: list[ComputerState]) -> None:
        delays = self._backoff.delays()
        while True:
            try:
                await self._ns.computer_states(batch)
                return
            except ApiError as exc:
                if exc.status < 500:  # the NS will not take it however often it is sent
                    log.warning("the NS refused computer states %s: %s", _names(batch), exc)
                    return
                problem: Exception = exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = exc
            delay = next(delays, None)
            if delay is None:
                log.warning("computer states %s not delivered: %s", _names(batch), problem)
                return
            log.info("computer states not delivered (%s); retry in %.1fs", problem, delay)
            await asyncio.sleep(delay)


def _names(batch: list[ComputerState]) -> str:
    return ", ".join(s.name for s in batch)
