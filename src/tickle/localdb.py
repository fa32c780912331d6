"""Small local SQLite databases: the agent's state, the task server's state, the outbox.

Standard library only (the agent imports it). Each database is one file in WAL mode with full sync,
so a committed write survives a crash, and runs in autocommit: a write of several statements is
made atomic with `transaction`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path


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
    for statement in schema:
        db.execute(statement)
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One atomic write: commits when the block ends, rolls back when it raises."""
    # IMMEDIATE takes the write lock up front: a writer never fails halfway on a busy database
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
