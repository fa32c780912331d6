"""The NS tickle server: tickles task servers when their clients have work or settings changed.

It finds work to announce in the database (pending executions nobody tickled for or pulled yet),
woken at once by a change committed in this process (`notify`: a run-now, a computer that moved, new
settings) and every `dispatch_poll_s` otherwise, so a run-now committed by another NS API process
sharing a PostgreSQL database is announced too. With PostgreSQL only the holder of an advisory lock
dispatches; a process that becomes the dispatcher (at start, or taking over from a dead one) first
tickles for all pending work: also work tickled before whose resends stopped with the previous
dispatcher, and work pulled whose answer may have been lost with it. A settings version change in
the database makes it send a SETTINGS tickle to every task server.

Acknowledgement: only a pull a tickle caused (`via=tickle`) acknowledges; the task server's
periodic check or its pull at start does not (a tickle that never arrives must end unreachable).
Such a pull in this process calls `ack` directly; one served by another process is seen as
`tickle_pulled_at` / `settings_pulled_at` later than the tickle's first send.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from prometheus_client import Gauge

from tickle import clock, wire
from tickle.metrics import ComponentMetrics
from tickle.ns.settings import NsSettings
from tickle.ns.stores import Stores
from tickle.ns.stores.inventory import TaskServerLink
from tickle.ns.sweeper import Sweeper
from tickle.tickling import Tickler

log = logging.getLogger(__name__)

T = TypeVar("T")
_LOCK_RETRY_S = 5.0
# how long a tasks tickle's `tickle_sent_at` stamp waits for the pull it causes to write it (in
# the pull's own transaction) before the tickle server writes it itself
STAMP_WAIT_S = 1.0


class TickleServer:
    """Dispatches NS→TS tickles; every public method runs on the event loop."""

    def __init__(self, settings: NsSettings, stores: Stores, metrics: ComponentMetrics) -> None:
        self._settings = settings
        self._stores = stores
        self._links: dict[str, TaskServerLink] = {}
        self._requested_at: dict[tuple[str, wire.Kind], float] = {}
        self._settings_version: int | None = None
        self._wake = asyncio.Event()
        self._lock = stores.database.dispatcher_lock() if settings.dispatcher_lock else None
        self._task: asyncio.Task[None] | None = None
        self._dispatcher_active = False
        self._active = Gauge(
            "tickle_dispatcher_active",
            "1 while this NS process is the active tickle dispatcher (PostgreSQL: holds the lock)",
            registry=metrics.registry,
        )
        self._sweeper = Sweeper(settings, stores.cancel, metrics)
        self._backoff = settings.tickle_backoff()
        # each task server's tickle state as last read or written (see `_on_reachable`), how
        # many writes this process started, and how many of them are not committed yet
        self._states: dict[str, str] = {}
        self._state_writes = 0
        self._state_writing = 0
        # tickle-caused pulls that failed in a row (see `pulling`)
        self._failed_pulls: dict[tuple[str, wire.Kind], int] = {}
        # when the tasks tickle to each task server was first sent, while its work is not
        # stamped `tickle_sent_at` yet (see `unstamped`), and the writes of those stamps;
        # SQLite only (one process, one writer at a time): on PostgreSQL another NS process
        # may serve the pull, and writers do not queue behind one another's
        self._stamp_in_pull = stores.database.dialect == "sqlite"
        self._unstamped: dict[str, float] = {}
        self._stamping: set[asyncio.Task[None]] = set()
        self.tickler = Tickler(
            settings.ns_id,
            self._key_for,
            metrics,
            self._backoff,
            on_unreachable=self._on_unreachable,
            on_reachable=self._on_reachable,
            on_sent=self._on_sent,
            before_resend=self._ack_if_pulled,
        )

    async def start(self) -> None:
        """Open the sending socket and start the dispatch loop."""
        await self.tickler.start()
        self._settings_version = (await self._db(self._stores.settings.settings)).version
        self._wake.set()  # first pass at once: work may be waiting since before a restart
        self._task = asyncio.create_task(self._run(), name="ns-tickle-dispatcher")

    async def close(self) -> None:
        """Stop dispatching, stop every resend, write the stamps still waiting, release the
        dispatcher lock."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.tickler.close()
        for name, sent_at in list(self._unstamped.items()):
            self._stamp_if_unstamped(name, sent_at)
        if self._stamping:
            await asyncio.wait(self._stamping)
        if self._lock is not None:
            await self._db(self._lock.release)
        self._set_active(False)

    @property
    def dispatcher_active(self) -> bool:
        """Whether this process is the active tickle dispatcher now (the gauge's value)."""
        return self._dispatcher_active

    def notify(self, task_servers: Iterable[str] = ()) -> None:
        """A change was committed (run now, a computer moved, new settings): run a pass now, which
        tickles for untickled work and, when the settings version moved, every task server.

        `task_servers`: the change is new work for these (a run-now). The dispatcher tickles
        those it knows at once, without a pass (its three reads of the database before the
        send were most of a run-now's first hop); one it does not know yet gets the pass. A
        tickle in flight to one of them coalesces the work into its follow-up, as in a pass.
        """
        names = set(task_servers)
        if not names or not self._dispatcher_active or not names <= self._links.keys():
            self._wake.set()
            return
        for name in sorted(names):
            self._tickle(self._links[name], wire.Kind.TASKS)

    def ack(self, task_server: str, kind: wire.Kind) -> bool:
        """A pull the tickle caused (work acks TASKS, settings acks SETTINGS): stop resending.
        Returns whether a tickle was in flight (see `tickle_again`)."""
        if not self.tickler.ack(task_server, kind):
            return False
        # a follow-up tickle (work came during the flight) starts now and covers all work
        # created until now: the dispatcher must not ask for yet another one
        self._requested_at[(task_server, kind)] = time.time()
        return True

    @contextlib.contextmanager
    def pulling(self, task_server: str, kind: wire.Kind, by_tickle: bool) -> Iterator[None]:
        """Around a pull: one the tickle caused (`by_tickle`) acknowledges it first (what is
        committed after this point gets a tickle of its own). If the pull then fails (a deadlock
        lost on PostgreSQL, the database briefly away), the task server got nothing: it is
        tickled again after the tickles' backoff (else it waited for its periodic check), at
        most their tries in a row until one of its pulls succeeds."""
        acked = by_tickle and self.ack(task_server, kind)
        try:
            yield
        except Exception:
            if acked:
                self._tickle_after_failed_pull(task_server, kind)
            raise
        self._failed_pulls.pop((task_server, kind), None)

    def unstamped(self, task_server: str) -> float | None:
        """When the tasks tickle to `task_server` was first sent, while the work it was for is
        not stamped `tickle_sent_at` yet: the pull it causes stamps it in its own transaction
        and says so (`stamped`); one that does not come within `STAMP_WAIT_S` leaves it to the
        tickle server. A write transaction of its own just after the send made the pull wait
        for SQLite's write lock. On PostgreSQL (None: the tickle server stamps at once) the pull
        may be served by another NS process, and writers do not wait for one another's."""
        return self._unstamped.get(task_server)

    def stamped(self, task_server: str, sent_at: float) -> None:
        """A pull committed the `tickle_sent_at` stamp of the tickle first sent at `sent_at`."""
        if self._unstamped.get(task_server) == sent_at:
            del self._unstamped[task_server]

    def _stamp_if_unstamped(self, task_server: str, sent_at: float) -> None:
        if self._unstamped.get(task_server) != sent_at:
            return  # a pull stamped it, or a later tickle wrote it when it was sent
        del self._unstamped[task_server]
        task = asyncio.create_task(self._stamp(task_server, sent_at))
        self._stamping.add(task)
        task.add_done_callback(self._stamping.discard)

    async def _stamp(self, task_server: str, sent_at: float) -> None:
        try:
            n = await self._db(self._stores.delivery.mark_tickle_sent, task_server, sent_at)
        except Exception:
            # the database may be briefly unavailable: the timeline misses the time, nothing
            # else (the dispatcher knows it tickled: `_requested_at`)
            log.warning("stamping the tasks tickle to %s failed", task_server, exc_info=True)
            return
        log.debug("tasks tickle to %s covers %d execution(s)", task_server, n)

    def _tickle_after_failed_pull(self, task_server: str, kind: wire.Kind) -> None:
        # after the tickles' backoff, and bounded by their tries until a pull succeeds: a
        # database that stays away must not make tickle and pull chase each other
        key = (task_server, kind)
        failed = self._failed_pulls.get(key, 0)
        if self._backoff.tries is not None and failed >= self._backoff.tries:
            log.warning(
                "%s: its last %d tickle-caused pulls failed: no more tickles until a pull "
                "succeeds (its periodic check)", task_server, failed,
            )  # fmt: skip
            return
        self._failed_pulls[key] = failed + 1
        asyncio.get_running_loop().call_later(
            self._backoff.delay(failed), self._tickle_again, task_server, kind
        )

    def _tickle_again(self, task_server: str, kind: wire.Kind) -> None:
        link = self._links.get(task_server)
        if link is not None:
            self._tickle(link, kind)

    async def dispatch_once(self, taking_over: bool = False) -> None:
        """One pass: refresh links, ack pulls seen in the database, tickle for new work/settings.

        `taking_over` (the first pass after this process became the dispatcher): tickle for all
        pending work, also work tickled before, whose resends died with the previous dispatcher,
        and work pulled whose answer may have died with it (see `pending_tickles`).
        """
        # what is read replaces the states we know only if none of our writes was under way
        # meanwhile: one started before and not committed yet is not in what was read
        state_writes, writing = self._state_writes, self._state_writing
        # the settings version before the links: a task server registered before the version
        # changed is among the links tickled for it (read after, a pass could tickle the links it
        # read before a registration committed for a version committed after it, and count the
        # version as sent: the task server registered between waited for its periodic check)
        version = (await self._db(self._stores.settings.settings)).version
        links = await self._db(self._stores.inventory.task_server_links)
        self._links = {link.name: link for link in links}
        if not writing and state_writes == self._state_writes:
            self._states = {link.name: link.tickle_state for link in links}
        for current in links:
            # a tickle sent before the task server moved (a run-now tickles from the links of
            # the last pass) is resent to where it is now
            self.tickler.readdress(current.name, current.addr)
        self._ack_from_db()
        self._tickle_settings(version)
        for pending in await self._db(self._stores.delivery.pending_tickles, taking_over):
            link = self._links.get(pending.task_server)
            if link is None:
                continue
            requested = self._requested_at.get((link.name, wire.Kind.TASKS), 0)
            if not taking_over and pending.newest_created_at <= requested:
                # a tickle requested after this work covers it: in flight, being stamped by
                # on_sent, or the follow-up the Tickler sends after an ack
                continue
            self._tickle(link, wire.Kind.TASKS)
        await self._tickle_for_cancels()
        await self._sweeper.sweep_if_due()

    async def _tickle_for_cancels(self) -> None:
        """Tickle the task servers that have not pulled since an execution of theirs was
        cancelled (its agent must hear of it); once per cancel, like work."""
        for name, newest in await self._db(self._stores.cancel.unheard_cancels, time.time()):
            link = self._links.get(name)
            if link is None or newest <= self._requested_at.get((name, wire.Kind.TASKS), 0):
                continue
            self._tickle(link, wire.Kind.TASKS)

    async def _run(self) -> None:
        poll = self._settings.dispatch_poll_s
        active = taking_over = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), poll if active else _LOCK_RETRY_S)
            self._wake.clear()
            try:
                now_active = self._lock is None or await self._db(self._lock.try_acquire)
                # kept until a pass succeeds: a failed first pass must not lose the re-tickle
                taking_over = taking_over or (now_active and not active)
                if now_active != active:
                    state = "became" if now_active else "is no longer"
                    log.info("%s the active tickle dispatcher", state)
                    self._set_active(now_active)
                active = now_active
                if active:
                    await self.dispatch_once(taking_over)
                    taking_over = False
            except Exception:
                # the database may be briefly unavailable; the next pass retries
                log.exception("tickle dispatch pass failed")

    def _set_active(self, active: bool) -> None:
        # one source of truth for the gauge and GET /api/about
        self._dispatcher_active = active
        self._active.set(1 if active else 0)

    def _tickle(self, link: TaskServerLink, kind: wire.Kind) -> None:
        key = (link.name, kind)
        if not self.tickler.in_flight(*key):
            self._requested_at[key] = time.time()
        log.debug("%s tickle to %s requested", kind.name.lower(), link.name)
        self.tickler.tickle(link.name, link.addr, kind)

    def _ack_from_db(self) -> None:
        for (name, kind), requested in list(self._requested_at.items()):
            link = self._links.get(name)
            if link is None or not self.tickler.in_flight(name, kind):
                continue
            self._ack_if_after(name, kind, requested, link.tickle_pulled_at,
                               link.settings_pulled_at)  # fmt: skip

    def _ack_if_after(
        self,
        name: str,
        kind: wire.Kind,
        requested: float,
        work_pulled: float | None,
        settings_pulled: float | None,
    ) -> None:
        """Ack the flight when the database shows a pull of its kind a tickle caused since it
        was requested (served by any NS process)."""
        pulled = work_pulled if kind is wire.Kind.TASKS else settings_pulled
        if pulled is not None and pulled >= requested:
            self.ack(name, kind)

    async def _ack_if_pulled(self, task_server: str, kind: wire.Kind) -> None:
        """Before a resend: a pull another NS process served (sharing the database) acks the
        tickle now, not at the next pass. Resent, it brought a second pull of all the task
        server's work (2,500 executions read, sent and compared again in issue 10's S3)."""
        requested = self._requested_at.get((task_server, kind))
        if requested is None:
            return
        try:
            work, settings = await self._db(self._stores.inventory.pulls_caused, task_server)
        except Exception:  # the database briefly away: the resend goes, as before
            log.debug("reading %s's pulls before a resend failed", task_server, exc_info=True)
            return
        self._ack_if_after(task_server, kind, requested, work, settings)

    def _tickle_settings(self, version: int) -> None:
        """Tickle every task server with SETTINGS when `version` is newer than the last seen."""
        previous, self._settings_version = self._settings_version, version
        if previous is None or version <= previous:
            return
        log.info("settings version %d: tickling %d task server(s)", version, len(self._links))
        for link in self._links.values():
            self._tickle(link, wire.Kind.SETTINGS)

    def _key_for(self, task_server: str) -> bytes | None:
        link = self._links.get(task_server)
        return link.key if link is not None else None

    async def _on_sent(self, task_server: str, kind: wire.Kind, first_sent: float) -> None:
        if kind is not wire.Kind.TASKS:
            return
        if not self._stamp_in_pull:
            await self._stamp(task_server, first_sent)
            return
        # the stamp waits for the pull (see `unstamped`); an earlier tickle's still waiting
        # is written now, its pull may never come
        earlier = self._unstamped.get(task_server)
        self._unstamped[task_server] = first_sent
        if earlier is not None:
            await self._stamp(task_server, earlier)
        asyncio.get_running_loop().call_later(
            STAMP_WAIT_S, self._stamp_if_unstamped, task_server, first_sent
        )

    async def _on_unreachable(self, task_server: str) -> None:
        offset = await self._db(self._stores.inventory.task_server_clock, task_server)
        if clock.skewed(offset, wire.DEFAULT_FRESHNESS_S):
            log.warning(
                "task server %s rejects tickles as stale: its clock is %+.1fs off ours; it will "
                "get work by polling", task_server, offset,
            )  # fmt: skip
            state = "clock_skewed"
        else:
            log.warning(
                "task server %s is tickle-unreachable: it will get work by polling", task_server
            )
            state = "unreachable"
        await self._set_state(task_server, state)

    async def _on_reachable(self, task_server: str) -> None:
        # every acknowledged tickle lands here: written only when the state changes (the
        # write competed with the pull's own for the database's write lock, on every run)
        await self._set_state(task_server, "reachable", only_if_changed=True)

    async def _set_state(self, task_server: str, state: str, only_if_changed: bool = False) -> None:
        if only_if_changed and self._states.get(task_server) == state:
            return
        self._states[task_server] = state
        self._state_writes += 1
        self._state_writing += 1
        try:
            await self._db(self._stores.inventory.set_task_server_state, task_server, state)
        finally:
            self._state_writing -= 1

    async def _db(self, fn: Callable[..., T], *args: object) -> T:
        # the stores are synchronous: keep their I/O off the event loop
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
