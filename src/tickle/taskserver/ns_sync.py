"""Pulls from the NS: work and settings, at once on a tickle, and periodically on its own.

A pull requested while one runs is coalesced into one more pull after it, so work created during a
pull is never missed and a burst of tickles costs at most two pulls. Every pull tells the NS why
(`via`): only one a tickle caused acknowledges the NS's tickle, so a periodic check landing in a
tickle's resend window never makes a task server with blocked tickles look reachable. The
periodic check is the task server's native tickle: work it finds there (or finds cached at start)
is tickled to the agents without any NS tickle.

A pull that failed because the NS is away or busy (no answer, 5xx, 429) is tried again on `RETRY`
after the NS's Retry-After, with full jitter, until it answers: an NS that restarted under a
pull its tickle caused may not tickle again, and the periodic check may be a minute off. The task
servers of a restarted NS come back spread over the window; a trigger meanwhile (the NS's tickle:
it is back) pulls at once, and so does an answer of the NS to another request of this task
server's (`NsClient.on_back`) unless the NS said how long to wait (Retry-After).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import aiohttp

from tickle.backoff import Backoff
from tickle.http import ApiError, retry_after_s
from tickle.messages import TsPullVia
from tickle.taskserver.agent_tickler import AgentTickler
from tickle.taskserver.ns_client import NsClient, ns_away
from tickle.taskserver.store import Store
from tickle.taskserver.work_cache import WorkCache

log = logging.getLogger(__name__)
# a pull the NS did not answer (away, restarting, busy): tried again over a window drawn anew each
# time, until it answers
RETRY = Backoff(base_s=1.0, max_s=30.0, tries=None, full_jitter=True)


class NsSync:
    """Owns the work and settings pulls and the periodic NS check."""

    def __init__(
        self,
        ns: NsClient,
        store: Store,
        work_cache: WorkCache,
        agents: AgentTickler,
        default_interval_s: float,
    ) -> None:
        self._ns = ns
        self._store = store
        self._work_cache = work_cache
        self._agents = agents
        self._default_interval_s = default_interval_s
        self.work = Coalesced("work pull", self._pull_work)
        self.settings = Coalesced("settings pull", self._pull_settings)
        ns.on_back(self.work.retry_now)
        ns.on_back(self.settings.retry_now)
        self._interval_changed = asyncio.Event()
        self._periodic: asyncio.Task[None] | None = None

    def check_interval_s(self) -> float:
        """The NS's `ts_check_interval_s` once known, else the local default."""
        current = self._store.settings()
        return float(current.ts_check_interval_s) if current else self._default_interval_s

    def start_periodic(self) -> None:
        self._periodic = asyncio.create_task(self._run_periodic())

    async def close(self) -> None:
        if self._periodic is not None:
            self._periodic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._periodic
        await self.work.close()
        await self.settings.close()

    async def refresh_clients(self) -> None:
        """Take the NS's list of this task server's clients (tokens, keys, addresses)."""
        clients = await self._ns.clients()
        self._store.replace_clients(clients)
        log.info("%d clients from the NS", len(clients))

    async def _pull_work(self, via: TsPullVia) -> None:
        work = await self._ns.work(via)
        # looked up by name: every client sorted for every pull grew with the fleet squared while
        # it registers (a pull per group of registrations: 10,000 agents over 4 task servers made
        # ~625 pulls each under cProfile); no change in S6's own figures
        if any(self._store.client(w.computer) is None for w in work.executions):
            # an agent registered through another process or moved here: learn its key first
            await self.refresh_clients()
        self._work_cache.apply(work)
        self._agents.tickle_pending()
        # the agents that pulled work cancelled since must hear of it now, not at their next poll
        self._agents.tickle_computers(self._work_cache.cancel(work))

    async def _pull_settings(self, via: TsPullVia) -> None:
        new = await self._ns.settings(via)
        old = self._store.settings()
        self._store.save_settings(new)
        if old is None or old.version != new.version:
            log.info("settings version %d from the NS", new.version)
            if old is not None:
                self._agents.tickle_settings()
        if old is None or old.ts_check_interval_s != new.ts_check_interval_s:
            self._interval_changed.set()

    async def _run_periodic(self) -> None:
        while True:
            self._interval_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._interval_changed.wait(), self.check_interval_s())
                continue  # a new interval: start waiting afresh
            log.debug("periodic NS check")
            self.settings.trigger("check")
            self.work.trigger("check")


class Coalesced:
    """Runs an async job on `trigger(via)`; triggers while it runs make it run once more after.

    The job gets why it runs. Triggers coalesced into one run merge: a tickle among them makes it
    a tickle run (the tickle must be acknowledged, and only a tickle-caused pull does that).
    """

    def __init__(
        self, name: str, job: Callable[[TsPullVia], Awaitable[None]], retry: Backoff = RETRY
    ) -> None:
        self._name = name
        self._job = job
        self._retry = retry
        self._again: TsPullVia | None = None
        self._triggered = asyncio.Event()  # cuts a retry's wait short
        self._cuttable = False  # in a retry's wait that the NS's return may cut (no Retry-After)
        self._task: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []  # `run` calls: for the next try to end

    def retry_now(self) -> None:
        """The NS answered again: a retry waiting for it (not for its Retry-After) goes now."""
        if self._cuttable:
            self._triggered.set()

    def trigger(self, via: TsPullVia) -> None:
        if self._task is not None and not self._task.done():
            self._again = "tickle" if "tickle" in (self._again, via) else via
            self._triggered.set()
            return
        self._task = asyncio.create_task(self._run(via))

    async def run(self, via: TsPullVia) -> None:
        """Trigger and wait for the next try to end (answered or not: its retries go on in the
        background)."""
        done = asyncio.get_running_loop().create_future()
        self._waiters.append(done)
        self.trigger(via)
        await asyncio.shield(done)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        _release(self._waiters)

    async def _run(self, via: TsPullVia) -> None:
        failures = 0
        while True:
            self._again = None
            self._triggered.clear()
            waiting, self._waiters = self._waiters, []
            try:
                await self._job(via)
                failures = 0
            except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
                if not ns_away(exc):
                    # refused, not away: the next tickle or periodic check tries again
                    log.warning("%s from the NS failed: %s", self._name, exc)
                else:
                    delay = self._retry.wait(failures, retry_after_s(exc))
                    failures += 1
                    log.warning("%s from the NS failed: %s; retry %d in %.1fs",
                                self._name, exc, failures, delay)  # fmt: skip
                    _release(waiting)
                    self._cuttable = not retry_after_s(exc)
                    try:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._triggered.wait(), delay)
                    finally:
                        self._cuttable = False
                    # the same pull again (one a tickle caused still acknowledges it), merged
                    # with what was asked for meanwhile
                    again = self._again
                    via = "tickle" if "tickle" in (again, via) else via
                    continue
            except Exception:
                log.exception("%s failed", self._name)
            finally:
                _release(waiting)
            if self._again is None:
                return
            via = self._again


def _release(waiters: list[asyncio.Future[None]]) -> None:
    for done in waiters:
        if not done.done():
            done.set_result(None)
