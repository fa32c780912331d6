"""The audit store: every operator action, from the API and the web console alike."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import Connection, insert, select

from tickle import messages as m
from tickle.ns.database import Database
from tickle.ns.driver import Driver, DriverSql
from tickle.ns.models import AuditEvent

_INSERT = insert(AuditEvent)
_DRIVER_INSERT = DriverSql(_INSERT)
# the longest target an audit row keeps (longer ones are cut with a marker)
_TARGET_MAX = 255


class AuditStore:
    """Audit events in the NS database."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def record(
        self, who: str, action: str, target: str, detail: dict[str, Any] | None = None
    ) -> None:
        """Record that `who` did `action` on `target` now."""
        with self._db.writing() as s:
            self.insert(s.connection(), who, action, target, detail)

    def insert(
        self,
        conn: Connection | Driver,
        who: str,
        action: str,
        target: str,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """`record`, in the transaction of `conn` (the action's own write: one commit)."""
        if len(target) > _TARGET_MAX:
            target = target[: _TARGET_MAX - 1] + "…"
        row = {"at": time.time(), "who": who, "action": action, "target": target}
        if isinstance(conn, Driver):  # SQLite's driver (a run-now's: see `driver`)
            _DRIVER_INSERT.execute(conn, row | {"id": None, "detail": json.dumps(detail or {})})
            return
        # Core, the statement built once: no ORM flush
        conn.execute(_INSERT, row | {"detail": detail or {}})

    def events(
        self, limit: int = 200, who: str | None = None, action: str | None = None
    ) -> list[m.AuditEventOut]:
        """The newest `limit` events, newest first (of one operator, with `who`; of one kind of
        action, with `action`)."""
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if who is not None:
            query = query.where(AuditEvent.who == who)
        if action is not None:
            query = query.where(AuditEvent.action == action)
        with self._db.reading() as s:
            return [
                m.AuditEventOut.model_validate(row, from_attributes=True)
                for row in s.scalars(query)
            ]
