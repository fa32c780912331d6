"""A commit made without a sync (`localdb.transaction(durable=False)`) does not checkpoint either,
though it leaves the write-ahead log over SQLite's default size: the `localdb.WalSync` that syncs it
checkpoints, in another thread, or the next synced commit does."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from tickle.localdb import WalSync
from tickle.outbox import Outbox, new_event_id

BODY = "x" * 400
# ~6 MB of events: past SQLite's default checkpoint size (1,000 pages, ~4 MB)
EVENTS = 15_000


def _fill(box: Outbox) -> None:
    for _ in range(EVENTS // 100):
        box.put_many([(new_event_id(), BODY) for _ in range(100)], durable=False)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _fill_synced(box: Outbox) -> None:
    for _ in range(EVENTS // 100):
        box.put_many([(new_event_id(), BODY) for _ in range(100)], durable=True)


def test_a_synced_commit_past_the_default_size_checkpoints_in_the_commit_itself(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path)
    _fill_synced(box)
    # copied into the database file by the commits themselves
    assert _size(path) > 4_000_000
    box.close()


def test_the_next_synced_commit_checkpoints_what_commits_not_synced_left(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path)
    _fill(box)
    assert _size(path) < 1_000_000
    box.put_many([(new_event_id(), BODY)], durable=True)
    assert _size(path) > 4_000_000
    assert box.depth() == EVENTS + 1
    box.close()


async def test_commits_leave_the_checkpoint_to_the_wal_sync_which_makes_it_in_another_thread(
    tmp_path: Path,
) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path)
    wal_sync = WalSync([path], checkpoint_every_s=0.0)
    threads: list[int] = []
    real = wal_sync.checkpoint_now

    def checkpoint_now() -> None:
        threads.append(threading.get_ident())
        real()

    wal_sync.checkpoint_now = checkpoint_now  # type: ignore[method-assign]
    _fill(box)
    assert _size(path) < 1_000_000  # no commit checkpointed
    assert _size(Path(f"{path}-wal")) > 4_000_000
    await wal_sync.sync()
    await wal_sync.checkpointed()
    assert wal_sync.checkpoints == 1
    assert threads
    assert threads[0] != threading.get_ident()
    assert _size(path) > 4_000_000  # the log's pages are in the database file now
    db = sqlite3.connect(path)
    busy, frames, checkpointed = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    db.close()
    assert busy == 0
    assert frames == checkpointed
    # every event is there, and the outbox goes on
    assert box.depth() == EVENTS
    box.put_many([(new_event_id(), BODY)], durable=False)
    assert box.depth() == EVENTS + 1
    box.close()


async def test_a_wal_sync_checkpoints_at_most_once_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    box = Outbox(path)
    wal_sync = WalSync([path], checkpoint_every_s=3600.0)
    # twice: a third fill takes the log past OFF_LOOP_AUTOCHECKPOINT_PAGES (~40 MB), which a
    # commit checkpoints itself
    for _ in range(2):
        _fill(box)
        await wal_sync.sync()
    await wal_sync.checkpointed()
    assert wal_sync.syncs == 2
    assert wal_sync.checkpoints == 0
    assert _size(path) < 1_000_000
    box.close()


def test_a_checkpoint_does_not_create_a_missing_database(tmp_path: Path) -> None:
    wal_sync = WalSync([tmp_path / "none.db"])
    wal_sync.checkpoint_now()
    assert not (tmp_path / "none.db").exists()
    assert wal_sync.checkpoints == 0
