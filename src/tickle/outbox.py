"""The durable outbox: status events survive a crash until the next hop has accepted them.

Used by the agent (events to its task server) and the task server (events to the NS). An event is
committed to SQLite before it is acknowledged to whoever produced it, forwarded at least once, and
removed only when the next hop says it has it (the NS records by event id exactly once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from pathlib import Path
from typing import Protocol

from tickle import localdb
from tickle.backoff import Backoff
from tickle.httpbase import retry_after_s
from tickle.metrics import Metrics


class StatusEvent(Protocol):
    """A status event of the task server (`tickle.messages.StatusEvent`); the agent, which has
    no pydantic, queues its msgspec ones serialized (`queue_bodies`)."""

    @property
    def event_id(self) -> str: ...

    def model_dump_json(self) -> str: ...


log = logging.getLogger(__name__)
# The most event bodies (characters of JSON) one forwarded batch carries, beyond its first event:
# status events carrying a step's whole output (up to messages.OUTPUT_MAX_BYTES each) go a few at
# a time, so a batch stays within the next hop's max_body_bytes (8 MiB by default).
BATCH_BYTES = 2 * 1024 * 1024

_SCHEMA = (
    # an event waits until the next hop accepts it (forwarded_at NULL); then its id (body
    # dropped) is kept a while: a producer's retry of an event already forwarded (its answer
    # lost, or its post timed out while the first one was served) is not queued again
    "CREATE TABLE IF NOT EXISTS outbox ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    " event_id TEXT NOT NULL UNIQUE,"
    " body TEXT NOT NULL,"
    " queued_at REAL NOT NULL,"
    " forwarded_at REAL,"
    " grp INTEGER)",
)
# the events waiting, in the order they go (see `Outbox`)
_WAITING_INDEX = (
    "CREATE INDEX IF NOT EXISTS outbox_waiting ON outbox (grp, seq) WHERE forwarded_at IS NULL"
)
# how long a forwarded event's id is remembered (a producer retries for far less)
FORWARDED_KEEP_S = 3600.0
# how often the ids remembered longer are dropped (one pass over the table)
PRUNE_EVERY_S = 60.0

SendBatch = Callable[[list[str]], Awaitable[list[str]]]
"""Send serialized events; return the ids the next hop accepted."""


def new_event_id() -> str:
    """A new status event's id: a UUID of version 7 (RFC 9562), the time in milliseconds
    followed by 74 random bits (from `os.urandom`).

    Ids made later sort after those made earlier, so an outbox (and the NS's events) inserts
    them beside each other at one end of its event-id indexes, where random (version 4) ids
    dirtied a page anywhere in them per event: an outbox's commit of 20 events wrote 22.7 pages
    to its log, now 8.0, and dropping 500 forwarded ones 275, now 58 (CPU per event queued and
    dropped 39 -> 27 us). Made by hand: `str(uuid.uuid4())` costs more than this."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10))
    value = (
        (ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76  # version
        | (rand >> 62 & 0xFFF) << 64
        | 0b10 << 62  # variant
        | rand & 0x3FFF_FFFF_FFFF_FFFF
    )
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Outbox:
    """A table of serialized events keyed by event id, in SQLite with WAL and full sync.

    A forwarded event is marked in its row (its body dropped), not moved to a table of forwarded
    ids: one statement and one index entry per event where there were three and four (S5's task
    server queues and forwards four events per agent). The events waiting are read by a partial
    index of their own (`outbox_waiting`): the forwarded rows kept beside them are never read.

    An event may belong to a group (the task server's: its execution's id): what waits goes out
    group by group, lowest first, each group's events in the order they came (an event of no
    group comes before the groups, in the order it came). A task server's backlog then goes to
    the NS with each execution's events side by side in one post, and the NS reads and updates an
    execution once per post: in the order they came, a fan-out's events came hop by hop (all its
    agents' `agent_tickled`, then their `agent_pulled`, then the agents' `started` and `finished`),
    so each post of 500 moved ~500 executions by one event each (issue 10, S2: 10,000 agents'
    40,000 events, 29,576 execution updates in 80 posts; grouped, 13,000). Executions' ids grow
    with their runs, so the oldest run's events go first."""

    def __init__(self, path: Path) -> None:
        self._db = localdb.connect(path, _SCHEMA, any_thread=True)
        _migrate(self._db)
        self._pruned_at = 0.0
        self._prune(time.time())

    def put_many(
        self, events: Iterable[tuple[str, str] | tuple[str, str, int | None]], durable: bool = True
    ) -> list[str]:
        """Queue (event id, body) or (event id, body, group) in one transaction; return the ids
        queued now.

        An event already queued, or already forwarded (within `FORWARDED_KEEP_S`), is ignored.
        `durable=False`: not synced (see `localdb.transaction`): the caller syncs (see
        `localdb.WalSync`), or the events' loss to a power cut costs nothing but the information
        they carry.
        """
        now = time.time()
        new: list[str] = []
        with localdb.transaction(self._db, durable=durable):
            for event in events:
                cur = self._db.execute(
                    "INSERT OR IGNORE INTO outbox (event_id, body, queued_at, grp)"
                    " VALUES (?, ?, ?, ?)",
                    (event[0], event[1], now, event[2] if len(event) > 2 else None),
                )
                if cur.rowcount == 1:
                    new.append(event[0])
        return new

    def put(self, event_id: str, body: str) -> bool:
        """Queue one event; False when it was already queued or forwarded."""
        return bool(self.put_many([(event_id, body)]))

    def peek(self, limit: int = 200, exclude: Collection[str] = ()) -> list[tuple[str, str]]:
        """The next `limit` events waiting, group by group (see the class's doc), but for those
        in `exclude` (in flight)."""
        rows = self._db.execute(
            "SELECT event_id, body FROM outbox INDEXED BY outbox_waiting"
            " WHERE forwarded_at IS NULL ORDER BY grp, seq LIMIT ?",
            (limit + len(exclude),),
        ).fetchall()
        return [(str(eid), str(body)) for eid, body in rows if eid not in exclude][:limit]

    def remove(self, event_ids: Iterable[str]) -> None:
        """The next hop has these events: drop them, and remember their ids a while."""
        now = time.time()
        ids = [(now, eid) for eid in event_ids]
        # not synced: lost to a power cut, they are forwarded again and recorded once (by id);
        # a sync on the event loop per forwarded batch cost every run a hop's worth of waiting
        with localdb.transaction(self._db, durable=False):
            self._db.executemany(
                "UPDATE outbox SET forwarded_at = ?, body = '' WHERE event_id = ?"
                " AND forwarded_at IS NULL",
                ids,
            )
        if now - self._pruned_at >= PRUNE_EVERY_S:
            self._prune(now)

    def _prune(self, now: float) -> None:
        """Forget the ids forwarded more than `FORWARDED_KEEP_S` ago."""
        self._pruned_at = now
        with localdb.transaction(self._db, durable=False):
            self._db.execute("DELETE FROM outbox WHERE forwarded_at < ?", (now - FORWARDED_KEEP_S,))

    def depth(self) -> int:
        return int(
            self._db.execute(
                "SELECT count(*) FROM outbox INDEXED BY outbox_waiting WHERE forwarded_at IS NULL"
            ).fetchone()[0]
        )

    def oldest_age(self) -> float:
        """Seconds the oldest queued event has waited (0 when none waits)."""
        oldest = self._db.execute(
            "SELECT min(queued_at) FROM outbox INDEXED BY outbox_waiting WHERE forwarded_at IS NULL"
        ).fetchone()[0]
        return 0.0 if oldest is None else max(0.0, time.time() - float(oldest))

    def close(self) -> None:
        self._db.close()


def _migrate(db: sqlite3.Connection) -> None:
    """An outbox of an earlier version: its forwarded ids were a table of their own; its events
    had no group (`grp`)."""
    columns = {str(r[1]) for r in db.execute("PRAGMA table_info(outbox)")}
    old = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'forwarded'"
    ).fetchone()
    if {"forwarded_at", "grp"} - columns or old is not None:
        with localdb.transaction(db):
            if "forwarded_at" not in columns:
                db.execute("ALTER TABLE outbox ADD COLUMN forwarded_at REAL")
            if "grp" not in columns:
                db.execute("ALTER TABLE outbox ADD COLUMN grp INTEGER")
            if old is not None:
                db.execute(
                    "INSERT OR IGNORE INTO outbox (event_id, body, queued_at, forwarded_at)"
                    " SELECT event_id, '', at, at FROM forwarded"
                )
                db.execute("DROP TABLE forwarded")
    db.execute(_WAITING_INDEX)


class OutboxForwarder:
    """Forwards the outbox to the next hop at once when woken, retrying with backoff on failure.

    Given `linger_s`, while busy (at least `busy_events` events queued in the last `BUSY_S`) a
    batch smaller than `batch_size` waits until `linger_s` after the previous send started, so
    a burst goes in fewer, larger batches (each post costs the next hop a request and a
    transaction; issue 10's S5 forwarded ~10 events per post). An event queued when not busy
    goes at once.

    Up to `in_flight` batches are sent at once: with 1, an event queued while a batch is on its
    way waits for that batch's answer (an agent's `finished` for its `started`'s, which the task
    server gives only once the event is on its disk). A failed send closes the gate to every
    send for its backoff; its events go again after it, maybe after later ones (the next hop
    records by event id, and a status never moves back). `reopen` ends that backoff early (the
    next hop answered another request), unless the next hop said how long to wait (Retry-After).
    """

    BUSY_S = 0.1

    def __init__(
        self,
        outbox: Outbox,
        send: SendBatch,
        metrics: Metrics,
        backoff: Backoff | None = None,
        batch_size: int = 200,
        batch_bytes: int = BATCH_BYTES,
        linger_s: float = 0.0,
        busy_events: int = 0,
        in_flight: int = 1,
    ) -> None:
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, not {in_flight}")
        self._linger_s = linger_s
        self._busy_events = busy_events
        self._in_flight = in_flight
        self._queued: deque[tuple[float, int]] = deque()  # (when, how many) of the last BUSY_S
        self._last_send: float | None = None  # when the previous send started (monotonic)
        self._outbox = outbox
        self._send = send
        self._metrics = metrics
        # full jitter: producers whose next hop restarted come back spread over the window
        self._backoff = backoff or Backoff(base_s=0.2, max_s=10.0, tries=None, full_jitter=True)
        self._attempt = 0  # failed sends in a row
        self._gate_until = 0.0  # no send before this (monotonic): a failed one's backoff
        self._gate_cuttable = False  # `reopen` may end it (no Retry-After said)
        self._reopened = asyncio.Event()
        self._batch_size = batch_size
        self._batch_bytes = batch_bytes
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flights: dict[asyncio.Task[None], set[str]] = {}  # sends on their way: their ids
        self._idle = asyncio.Event()
        self._deferred: asyncio.TimerHandle | None = None  # the wake of events that may wait
        self._metrics.outbox_depth.set(outbox.depth())
        # read at scrape time: the depth grows while the next hop is down and nothing is sent
        self._metrics.outbox_depth.set_function(self._depth)
        self._metrics.outbox_oldest_age.set_function(self._oldest_age)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        self._wake.set()  # deliver what a previous run left behind

    def queue(
        self, events: Iterable[StatusEvent], durable: bool = True, within_s: float | None = None
    ) -> list[str]:
        """Commit `events` to the outbox (`durable`: synced, see `Outbox.put_many`) and forward
        them now; return the ids new to it (not queued or forwarded before).

        `within_s`: events that may wait go with the next ones forwarded, or within that long
        (a task server's own hop reports ride with its agent's next event: one post, not three)."""
        bodies = ((e.event_id, e.model_dump_json()) for e in events)
        return self.queue_bodies(bodies, durable, within_s)

    def queue_bodies(
        self,
        events: Iterable[tuple[str, str] | tuple[str, str, int | None]],
        durable: bool = True,
        within_s: float | None = None,
    ) -> list[str]:
        """`queue` of events already serialized: (event id, its JSON), or (event id, its JSON,
        its group: see `Outbox`)."""
        new = self._outbox.put_many(events, durable)
        if self._linger_s and new:
            self._queued.append((time.monotonic(), len(new)))
        if within_s is None:
            self.wake()
        elif new:
            self._idle.clear()
            if self._deferred is None:
                self._deferred = asyncio.get_running_loop().call_later(within_s, self.wake)
        return new

    def wake(self) -> None:
        """Something is waiting in the outbox: forward now."""
        self._cancel_deferred()
        self._idle.clear()
        self._wake.set()

    def reopen(self) -> None:
        """The next hop answers again: a failed send's backoff ends now, unless the next hop
        asked for it (Retry-After)."""
        if self._gate_cuttable and self._gate_until > time.monotonic():
            self._gate_until = 0.0
            self._gate_cuttable = False
            self._reopened.set()

    def _cancel_deferred(self) -> None:
        if self._deferred is not None:
            self._deferred.cancel()
            self._deferred = None

    async def drained(self, within_s: float) -> bool:
        """Wait until the outbox is empty (True) or the timeout passes (False)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), within_s)
        return self._outbox.depth() == 0

    def _depth(self) -> float:
        try:
            return float(self._outbox.depth())
        except sqlite3.ProgrammingError:  # closed at shutdown
            return 0.0

    def _oldest_age(self) -> float:
        try:
            return self._outbox.oldest_age()
        except sqlite3.ProgrammingError:  # closed at shutdown
            return 0.0

    async def stop(self) -> None:
        self._cancel_deferred()
        tasks = [t for t in (self._task, *self._flights) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await self._wake.wait()  # new events, or a send came back
            self._wake.clear()
            # new events do not cut a failed send's backoff short: an unreachable hop is not
            # hammered
            wait = self._gate_until - time.monotonic()
            if wait > 0:
                self._reopened.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._reopened.wait(), wait)
                self._wake.set()  # look again: the gate may have moved meanwhile
                continue
            while len(self._flights) < self._in_flight:
                await self._linger()
                if self._gate_until > time.monotonic():  # a send failed meanwhile
                    self._wake.set()
                    break
                in_flight = {eid for ids in self._flights.values() for eid in ids}
                batch = _within(self._outbox.peek(self._batch_size, in_flight), self._batch_bytes)
                if not batch:
                    break
                self._last_send = time.monotonic()
                flight = asyncio.create_task(self._fly(batch))
                self._flights[flight] = {eid for eid, _ in batch}
            if not self._flights and not self._wake.is_set():
                self._metrics.outbox_depth.set(0)
                self._idle.set()

    async def _fly(self, batch: list[tuple[str, str]]) -> None:
        """Send one batch; drop what the next hop accepted, or close the gate for a while."""
        try:
            try:
                accepted = await self._send([body for _, body in batch])
            except Exception as exc:
                # no sooner than a busy next hop asked (Retry-After), spread after that
                retry_after = retry_after_s(exc)
                delay = self._backoff.wait(self._attempt, retry_after)
                self._attempt += 1
                log.warning(
                    "forwarding %d events failed (%s); retry in %.1fs", len(batch), exc, delay
                )
                self._close_gate(delay, cuttable=not retry_after)
                return
            self._attempt = 0
            ids = {eid for eid, _ in batch} & set(accepted)
            self._outbox.remove(ids)
            self._metrics.outbox_depth.set(self._outbox.depth())
            if not ids:  # the next hop refused all of them: do not spin
                log.error("next hop accepted none of %d events; backing off", len(batch))
                self._close_gate(self._backoff.cap(5))
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._flights.pop(task, None)
            self._wake.set()

    def _close_gate(self, delay: float, cuttable: bool = False) -> None:
        until = time.monotonic() + delay
        if until > self._gate_until:
            self._gate_until = until
            self._gate_cuttable = cuttable

    async def _linger(self) -> None:
        """While busy, wait until `linger_s` after the previous send started, unless a full
        batch is waiting."""
        if not self._linger_s or self._last_send is None:
            return
        now = time.monotonic()
        wait = self._last_send + self._linger_s - now
        if wait <= 0:
            return
        while self._queued and self._queued[0][0] < now - self.BUSY_S:
            self._queued.popleft()
        if sum(n for _, n in self._queued) < self._busy_events:
            return
        if self._outbox.depth() >= self._batch_size:
            return
        await asyncio.sleep(wait)


def _within(batch: list[tuple[str, str]], max_bytes: int) -> list[tuple[str, str]]:
    """The first events of `batch` whose bodies fit `max_bytes` together (always the first)."""
    size = 0
    for n, (_, body) in enumerate(batch):
        size += len(body)
        if n and size > max_bytes:
            return batch[:n]
    return batch
