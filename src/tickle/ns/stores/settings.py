"""The settings store: the central settings handed down to task servers and agents, and their
version (a single row)."""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from tickle import messages as m
from tickle.ns import views
from tickle.ns.credentials import Caller
from tickle.ns.database import Database
from tickle.ns.models import Settings, TaskServer


class SettingsStore:
    """The central settings in the NS database."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def settings(self) -> m.SettingsOut:
        with self._db.reading() as s:
            return views.settings_out(_settings_row(s))

    def pull_settings(self, ts: Caller, now: float, via: m.TsPullVia) -> m.SettingsOut:
        """The task server's settings pull; one a tickle caused is stamped, so another process
        can see the acknowledgement."""
        if via != "tickle":
            return self.settings()
        with self._db.writing() as s:
            s.execute(
                update(TaskServer).where(TaskServer.id == ts.id).values(settings_pulled_at=now)
            )
            return views.settings_out(_settings_row(s))

    def update_settings(self, body: m.SettingsUpdate) -> tuple[m.SettingsOut, bool]:
        """Change the central settings and bump their version; whether anything changed.

        An update that changes nothing keeps the version: task servers and agents have nothing
        to pull."""
        with self._db.writing() as s:
            # locked: on PostgreSQL another NS process's change waits, then bumps again
            row = _settings_row(s, lock=True)
            changes = {
                field: value
                for field, value in body.model_dump(exclude_none=True).items()
                if getattr(row, field) != value
            }
            for field, value in changes.items():
                setattr(row, field, value)
            if changes:
                row.version += 1
            return views.settings_out(row), bool(changes)


def _settings_row(s: Session, lock: bool = False) -> Settings:
    row = s.get(Settings, 1, with_for_update=lock)
    if row is None:  # the migration inserts it; a hand-made database may lack it
        row = Settings(
            id=1, version=1, task_request_interval_s=1800, poll_jitter_fraction=0.1,
            ts_check_interval_s=60, long_poll=False, long_poll_timeout_s=55,
        )  # fmt: skip
        s.add(row)
        s.flush()
    return row
