"""Small local SQLite databases: the agent's state, the task server's state, the outbox.

Standard library only (the agent imports it). Each database is one file in WAL mode with full sync,
so a committed write survives a crash, and runs in autocommit: a write of several statements is
made atomic with `transaction`. `HighWaterMarks` keeps a tickle listener's replay marks in the
database of its component. `WalSync` makes writes committed without a sync durable together,
off the event loop (group commit), and checkpoints their databases there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tickle import wire

log = logging.getLogger(__name__)

# SQLite copies its write-ahead log into the database file (a checkpoint) in the commit that leaves
# the log over `wal_autocheckpoint` pages (DEFAULT_AUTOCHECKPOINT_PAGES, ~4 MB), and syncs both
# files: a sync on the event loop after all, in a commit made without one (`transaction(durable=
# False)`). A task server's outbox, queueing events in batches of 100, spent 8.1-12.0 us an event
# with it, 6.3-6.6 without, and the commit that checkpointed blocked its loop 12-14 ms. Such a
# commit checkpoints only past this many pages (~40 MB), should nothing else have: the next synced
# commit does, or the `WalSync` that syncs it, in another thread.
OFF_LOOP_AUTOCHECKPOINT_PAGES = 10_000
DEFAULT_AUTOCHECKPOINT_PAGES = 1_000
# how often at most a `WalSync` checkpoints its databases while it syncs commits
CHECKPOINT_EVERY_S = 1.0


def connect(
    path: Path, schema: Iterable[str] = (), *, any_thread: bool = False
) -> sqlite3.Connection:
    """Open the database at `path` (creating it and its folder) and run the `schema` statements.

    `any_thread`: the connection may be used from other threads than the one that opened it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=not any_thread)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(f"PRAGMA wal_autocheckpoint={DEFAULT_AUTOCHECKPOINT_PAGES}")
    for statement in schema:
        db.execute(statement)
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection, durable: bool = True) -> Iterator[None]:
    """One atomic write: commits when the block ends, rolls back when it raises.

    `durable=False`: the commit is not synced to disk (WAL, synchronous=NORMAL): still atomic
    and surviving a crash of the process, but a power cut may undo it until the next durable
    commit (whose sync covers it). For writes that may be lost that way, e.g. dropping what
    the next hop has acknowledged (it would be sent again, and is recorded once by its id).
    Nor does it checkpoint, which syncs (see OFF_LOOP_AUTOCHECKPOINT_PAGES).
    """
    if not durable:
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(f"PRAGMA wal_autocheckpoint={OFF_LOOP_AUTOCHECKPOINT_PAGES}")
    # IMMEDIATE takes the write lock up front: a writer never fails halfway on a busy database
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    finally:
        if not durable:
            db.execute(f"PRAGMA wal_autocheckpoint={DEFAULT_AUTOCHECKPOINT_PAGES}")
            db.execute("PRAGMA synchronous=FULL")


class WalSync:
    """Durability for writes committed with `transaction(durable=False)`, shared by many.

    `sync` returns once the write-ahead logs of the databases at `paths` are on disk: synced
    (fsync) by a sync that started after `sync` was called, in a thread, so the event loop goes
    on serving meanwhile. Calls made while a sync runs share the next one: one fsync per database
    for all of them, where a full-sync commit blocks the loop for one per write. The write is as
    durable as SQLite's full sync makes it: its WAL frames are on disk (recovery replays them).

    It also checkpoints the databases (copies their logs into them), `checkpoint_every_s` at most
    while it syncs, in another thread, which the commits not synced leave undone (see
    OFF_LOOP_AUTOCHECKPOINT_PAGES): a passive checkpoint, which waits for no writer, so the loop's
    commits go on meanwhile.
    """

    def __init__(
        self, paths: Iterable[Path], checkpoint_every_s: float = CHECKPOINT_EVERY_S
    ) -> None:
        self.databases = list(paths)
        self.paths = [Path(f"{p}-wal") for p in self.databases]
        self.syncs = 0  # syncs made (each of every database)
        self.checkpoints = 0  # checkpoints made (each of every database)
        self._checkpoint_every_s = checkpoint_every_s
        self._checkpointed_at = time.monotonic()
        self._checkpointing: asyncio.Task[None] | None = None
        self._waiting: list[asyncio.Future[None]] = []
        self._driver: asyncio.Task[None] | None = None

    async def sync(self) -> None:
        """Return when what was committed before this call is on disk; OSError if a sync failed."""
        done = asyncio.get_running_loop().create_future()
        self._waiting.append(done)
        if self._driver is None:
            self._driver = asyncio.create_task(self._drive())
        await done

    async def _drive(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                failed: OSError | None = None
                try:
                    await asyncio.to_thread(self._sync_files)
                except OSError as exc:
                    failed = exc
                for done in batch:
                    if done.done():  # its caller was cancelled
                        continue
                    if failed is None:
                        done.set_result(None)
                    else:
                        done.set_exception(failed)
                self._checkpoint_if_due()
        finally:
            self._driver = None

    def _checkpoint_if_due(self) -> None:
        """Start a checkpoint in another thread if none ran for `checkpoint_every_s`."""
        if self._checkpointing is not None:
            return
        now = time.monotonic()
        if now - self._checkpointed_at < self._checkpoint_every_s:
            return
        self._checkpointed_at = now
        self._checkpointing = asyncio.create_task(asyncio.to_thread(self.checkpoint_now))
        self._checkpointing.add_done_callback(self._checkpointed)

    def _checkpointed(self, task: asyncio.Task[None]) -> None:
        self._checkpointing = None
        if not task.cancelled() and task.exception() is not None:
            log.warning("checkpointing %s failed: %s", self.databases, task.exception())

    def checkpoint_now(self) -> None:
        """A passive checkpoint of each database, on the caller's thread (its own connection)."""
        for path in self.databases:
            if not path.exists():  # nothing to copy (and connecting would create it)
                continue
            db = sqlite3.connect(path, isolation_level=None)
            try:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            finally:
                db.close()
            self.checkpoints += 1

    @property
    def busy(self) -> bool:
        """A sync runs (what is committed now goes with the next one)."""
        return self._driver is not None

    async def idle(self) -> None:
        """Return once no sync runs (at once if none does; a checkpoint may run)."""
        while self._driver is not None:
            await asyncio.wait({self._driver})

    async def checkpointed(self) -> None:
        """Return once no checkpoint runs (at once if none does)."""
        while self._checkpointing is not None:
            await asyncio.wait({self._checkpointing})

    def sync_now(self) -> None:
        """Sync on the caller's thread (blocking it): for a caller that cannot wait (stopping)."""
        self._sync_files()

    def _sync_files(self) -> None:
        for path in self.paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # no log (yet, or closed): nothing is waiting in one
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.syncs += 1


def identity(db: sqlite3.Connection) -> str:
    """The component's identity: a secret made on first use and kept in `db`.

    It registers with it: the NS keeps its SHA-256 and refuses a registration under the same
    name that brings another one, so a second agent or task server cannot take the name over.
    """
    db.execute(
        "CREATE TABLE IF NOT EXISTS identity (id INTEGER PRIMARY KEY CHECK (id = 1),"
        " secret TEXT NOT NULL)"
    )
    db.execute(
        "INSERT OR IGNORE INTO identity (id, secret) VALUES (1, ?)", (secrets.token_urlsafe(32),)
    )
    return str(db.execute("SELECT secret FROM identity WHERE id = 1").fetchone()[0])


class HighWaterMarks:
    """The tickle listener's high-water marks (`wire.MarkStore`): one row per sender.

    Written through: every accepted tickle that raises its sender's mark commits it (one small
    statement) before the tickle counts. Batching the writes would leave a window in which a crash
    forgets an accepted tickle, and a copy replayed inside the freshness window would pull again:
    the one case the marks are for. The cost stays small because only accepted tickles write, and
    accepting needs the link's key: forged floods never touch the disk, and senders send at most
    one tickle in flight per target and kind, each followed by a pull that costs far more.

    The commit is not synced (`transaction(durable=False)`): it survives a crash of the process
    (the WAL is written before `save` returns), which is what the marks guard against. Only a
    power cut or a crash of the host could undo it, and only until the next synced commit in
    the same database, which the run the tickle announced makes (the agent's executions seen;
    the task server's cache when the agent's events come): that sync covers the WAL up to the
    mark. A host back within the freshness window with the mark lost lets one copy cause one
    more authenticated pull, no more. The sync was a disk flush on every tickle's way to its
    pull, on the event loop: a few milliseconds of the hop, more on a busy disk.
    """

    _SCHEMA = (
        # seq is a u64: kept as decimal text, past SQLite's signed INTEGER
        "CREATE TABLE IF NOT EXISTS tickle_marks ("
        " sender TEXT PRIMARY KEY, seq TEXT NOT NULL, sent_at_ms INTEGER NOT NULL)",
    )

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        for statement in self._SCHEMA:
            db.execute(statement)

    def load(self) -> dict[str, wire.HighWaterMark]:
        rows = self._db.execute("SELECT sender, seq, sent_at_ms FROM tickle_marks")
        return {str(s): wire.HighWaterMark(int(q), int(t)) for s, q, t in rows}

    def save(self, sender: str, mark: wire.HighWaterMark) -> None:
        with transaction(self._db, durable=False):
            self._db.execute(
                "INSERT INTO tickle_marks (sender, seq, sent_at_ms) VALUES (?, ?, ?)"
                " ON CONFLICT (sender) DO UPDATE SET seq = excluded.seq,"
                " sent_at_ms = excluded.sent_at_ms",
                (sender, str(mark.seq), mark.sent_at_ms),
            )
