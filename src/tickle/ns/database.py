"""The NS database: one engine, short read and write transactions, the schema's migrations, the
PostgreSQL dispatcher lock, and the retry of a write that lost an insert race.

SQLite (WAL) is the embedded default; any SQLAlchemy URL works (PostgreSQL via psycopg), so several
NS API processes can share one database. Everything here is synchronous: the API calls the stores
from its threadpool and the tickle server from an executor, never on the event loop.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from tickle.ns import migrations
from tickle.ns.driver import Driver

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DISPATCHER_LOCK_KEY = 0x7469636B6C65_02  # "tickle" + 2: the one active tickle dispatcher


class Database:
    """The NS database behind every store."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _create_engine(url)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite: writers take the write lock at BEGIN, so a read-then-write transaction never
        # fails half-way with "database is locked" (busy_timeout makes them queue instead)
        self._writer = self.engine.execution_options(tickle_write=True)
        self._write = sessionmaker(self._writer, expire_on_commit=False)
        self._closed = False
        # SQLite has one writer at a time: writers queue on this lock, each woken the moment the
        # last one commits, rather than in SQLite's busy handler, which sleeps up to 100 ms
        # between tries (PostgreSQL: rows are locked, writers run side by side)
        self._write_lock: threading.RLock | contextlib.nullcontext[None] = (
            threading.RLock() if self.dialect == "sqlite" else contextlib.nullcontext()
        )
        event.listen(self.engine, "checkin", self._on_checkin)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self) -> None:
        """Apply the Alembic migrations shipped in the package (idempotent)."""
        migrations.upgrade(self.engine)

    def schema_revision(self) -> str | None:
        """The Alembic revision stamped in the database (None: not migrated)."""
        return migrations.current_revision(self.engine)

    def close(self) -> None:
        self._closed = True
        self.engine.dispose()

    def _on_checkin(self, dbapi_conn: Any, _record: Any) -> None:
        # dispose() closes only the connections in the pool: one still checked out by a request
        # thread when the NS closed would linger in the discarded pool until garbage collection
        if self._closed:
            dbapi_conn.close()

    @contextlib.contextmanager
    def reading(self) -> Iterator[Session]:
        """A read transaction."""
        with self._read() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def writing(self) -> Iterator[Session]:
        """A write transaction (SQLite: holds the write lock from its start)."""
        with self._write_lock, self._write() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def writing_core(self) -> Iterator[Connection]:
        """`writing` on a Core connection, for the hot paths that use no ORM object: the
        session's own begin and commit cost a work pull more than half its statements did."""
        with self._write_lock, self._writer.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def writing_driver(self) -> Iterator[Driver]:
        """SQLite only: `writing_core` on the driver's own connection, for `DriverSql`
        statements (see `tickle.ns.driver`). Its errors are raised as SQLAlchemy raises
        them (an `IntegrityError` for `retry_on_conflict`)."""
        if self.dialect != "sqlite":
            raise RuntimeError(f"writing_driver is for SQLite, not {self.dialect}")
        with self._write_lock:
            pooled = self.engine.raw_connection()  # its pool's: set up as every connection is
            try:
                assert isinstance(pooled.driver_connection, sqlite3.Connection)
                driver = Driver(pooled.driver_connection, self.engine)
                try:
                    driver.begin()
                    yield driver
                    driver.commit()
                except sqlite3.Error as exc:
                    raise DBAPIError.instance(None, None, exc, sqlite3.Error) from exc
                finally:
                    driver.rollback()  # when it failed: nothing of it stays
            finally:
                pooled.close()

    def dispatcher_lock(self) -> DispatcherLock:
        return DispatcherLock(self.engine)


def retry_on_conflict(write: Callable[[], _T], tries: int = 3) -> _T:
    """Run a read-then-insert write again when its insert lost a race to another process.

    Two NS processes (or two threads) both read "absent" and both insert; the one that commits
    second gets an IntegrityError. By the next try the row exists, so the write takes its other
    path (update, or skip what is already recorded) — the answer it would have given had it come
    second in the first place.
    """
    for _ in range(tries - 1):
        try:
            return write()
        except IntegrityError:
            continue
    return write()


class DispatcherLock:
    """PostgreSQL: a session advisory lock held on a dedicated connection, so exactly one NS
    process dispatches tickles. Other databases (SQLite: one process) always hold it."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: Connection | None = None
        self._shared = engine.dialect.name == "postgresql"

    def try_acquire(self) -> bool:
        """Whether this process is the dispatcher now (takes the lock if free)."""
        if not self._shared:
            return True
        try:
            if self._conn is not None:
                self._conn.execute(text("SELECT 1"))  # still alive, so still holding it
                return True
            conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            got = bool(
                conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": DISPATCHER_LOCK_KEY})
            )
            if got:
                self._conn = conn
                log.debug("dispatcher lock taken")
            else:
                conn.close()
            return got
        except Exception:
            log.warning("dispatcher lock connection lost", exc_info=True)
            self.release()
            return False

    def release(self) -> None:
        """Stop being the dispatcher: end the lock's database session, which frees the lock."""
        if self._conn is not None:
            try:
                # unlocked here, at once: the end of the session below frees it too, but only
                # once the server has seen the connection go (another process trying right
                # after could still find it held)
                self._conn.execute(
                    text("SELECT pg_advisory_unlock(:k)"), {"k": DISPATCHER_LOCK_KEY}
                )
            except Exception:
                log.debug("unlocking the dispatcher lock failed", exc_info=True)
            try:
                # close() alone would hand the session, lock held, back to the pool: another
                # process could not dispatch until this one's engine is disposed
                self._conn.invalidate()
                self._conn.close()
            except Exception:
                log.debug("closing the dispatcher lock connection failed", exc_info=True)
            self._conn = None


def _create_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = conn.get_execution_options().get("tickle_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
