"""Ending executions that will not end by themselves: cancelled by an operator, expired before
they started, or lost with their computer.

- Cancel: an execution no agent pulled yet ends `cancelled` at once (final: its task server drops
  it from its cache at its next work pull, which the tickle server causes); one its agent pulled
  keeps running until the agent hears of the cancel — the task server lists it in `cancel` at
  every work pull for `CANCEL_NOTICE_S`, and hands it to the agent at its next pull — and then
  ends as the agent reports it (`cancelled`, or how it ended before the cancel reached it).
- Expiry: an execution of a run with an expiry, not started by then, ends `expired`.
- Lost: an execution neither it nor its computer was heard from within
  `lost_after_intervals` Task Request Intervals plus `lost_grace_s` ends `lost`; for a running one
  the bound counts from when its steps' timeouts would have ended it. `lost` gives way to the
  `finished` its agent reports if it comes back (lifecycle.py).

Each of these is one conditional UPDATE per execution (its status must still be unfinished), so
an execution ends once, also when several NS processes sweep at the same time.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, bindparam, exists, func, or_, select, update
from sqlalchemy.orm import Session

from tickle import messages as m
from tickle.ns.database import Database
from tickle.ns.driver import Driver, DriverSql
from tickle.ns.errors import NotFound
from tickle.ns.models import Computer, Execution, ExecutionPull, Run, TaskServer
from tickle.ns.models import Settings as SettingsRow

log = logging.getLogger(__name__)

# how long a task server keeps hearing of a cancel at its work pulls (its agents may be offline)
CANCEL_NOTICE_S = 86400.0
_UNFINISHED = ("pending", "delivered", "running")
# the executions cancelled since `since` of the task server `ts_id`'s clients, or pulled by it;
# built once (building it cost more than running it, on every work pull). Found by the cancels'
# index, each then checked: `IN` subqueries made SQLite read every pull ever noted, on every pull.
# Unordered: ordered by id, SQLite read every execution instead
_CANCELLED_FOR = select(Execution.id).where(
    Execution.cancel_requested_at >= bindparam("since"),
    or_(
        exists().where(
            Computer.id == Execution.computer_id, Computer.task_server_id == bindparam("ts_id")
        ),
        exists().where(
            ExecutionPull.execution_id == Execution.id,
            ExecutionPull.task_server_id == bindparam("ts_id"),
        ),
    ),
)


_DRIVER_CANCELLED_FOR = DriverSql(_CANCELLED_FOR)


def cancelled_for(conn: Connection | Driver, ts_id: int, now: float) -> list[int]:
    """Executions cancelled lately of the task server `ts_id`'s clients, or pulled by it, in id
    order (read in the caller's transaction: a work pull's; on SQLite, maybe by its driver)."""
    params = {"since": now - CANCEL_NOTICE_S, "ts_id": ts_id}
    if isinstance(conn, Driver):
        return sorted(row[0] for row in _DRIVER_CANCELLED_FOR.execute(conn, params))
    return sorted(conn.scalars(_CANCELLED_FOR, params))


@dataclass(frozen=True, slots=True)
class Swept:
    """What one sweep ended."""

    expired: list[int]
    lost: list[int]


class CancelStore:
    """Cancel, expiry and loss of executions in the NS database."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def cancel(self, run_id: int, execution_id: int | None, now: float) -> m.CancelOut:
        """Cancel a run's unfinished executions (or one of them)."""
        with self._db.writing() as s:
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} does not exist")
            query = select(Execution).where(Execution.run_id == run_id).order_by(Execution.id)
            if execution_id is not None:
                query = query.where(Execution.id == execution_id)
            rows = list(s.scalars(query.with_for_update(of=Execution)))
            if execution_id is not None and not rows:
                raise NotFound(f"execution {execution_id} is not one of run {run_id}")
            out = m.CancelOut(run_id=run_id, cancelled=[], stopping=[], already_final=[])
            for ex in rows:
                if ex.status in m.FINAL_STATUSES:
                    out.already_final.append(ex.id)
                    continue
                if ex.cancel_requested_at is None:
                    ex.cancel_requested_at = now
                if ex.status == "pending":
                    _end(ex, "cancelled", now)
                    out.cancelled.append(ex.id)
                else:
                    out.stopping.append(ex.id)
            return out

    def unheard_cancels(self, now: float) -> list[tuple[str, float]]:
        """Task servers that have not pulled work since an execution of their clients was
        cancelled (within `CANCEL_NOTICE_S`), with the newest such cancel."""
        with self._db.reading() as s:
            rows = s.execute(
                select(TaskServer.name, func.max(Execution.cancel_requested_at))
                .select_from(Execution)
                .join(Computer, Execution.computer_id == Computer.id)
                .join(TaskServer, Computer.task_server_id == TaskServer.id)
                .where(
                    Execution.cancel_requested_at >= now - CANCEL_NOTICE_S,
                    Execution.cancel_requested_at > func.coalesce(TaskServer.last_pull_at, 0.0),
                )
                .group_by(TaskServer.name)
            )
            return [(str(name), float(newest or 0.0)) for name, newest in rows]

    def sweep(self, now: float, lost_intervals: float, lost_grace_s: float) -> Swept:
        """End the executions that expired unstarted and those lost with their computer."""
        with self._db.writing() as s:
            expired = _expire(s, now)
            lost = _lose(s, now, lost_intervals, lost_grace_s)
        if expired or lost:
            log.info("executions expired: %s; lost: %s", expired, lost)
        return Swept(expired, lost)


def _expire(s: Session, now: float) -> list[int]:
    ids = list(
        s.scalars(
            select(Execution.id).where(
                Execution.expires_at < now,
                Execution.status.in_(("pending", "delivered")),
                Execution.started_at.is_(None),
            )
        )
    )
    return _end_where_unfinished(s, ids, "expired", now, unstarted=True)


def _lose(s: Session, now: float, lost_intervals: float, lost_grace_s: float) -> list[int]:
    settings = s.get(SettingsRow, 1)
    interval = float(settings.task_request_interval_s if settings else 1800)
    bound = lost_intervals * interval + lost_grace_s
    candidates = s.execute(
        select(Execution, Computer.last_contact_at)
        .join(Computer, Execution.computer_id == Computer.id)
        .where(Execution.status.in_(_UNFINISHED), Execution.created_at < now - bound)
    ).all()
    lost = [ex.id for ex, contact in candidates if _last_heard(ex, contact) < now - bound]
    return _end_where_unfinished(s, lost, "lost", now)


def _last_heard(ex: Execution, last_contact_at: float | None) -> float:
    """When the NS last had a sign of this execution or its computer (a running one: when its
    steps' timeouts would have ended it, at the latest)."""
    times = [ex.created_at, ex.agent_pulled_at, ex.started_at, last_contact_at]
    heard = max(t for t in times if t is not None)
    if ex.started_at is not None:
        timeouts = sum(float(step.get("timeout_s", 0.0)) for step in ex.steps)
        heard = max(heard, ex.started_at + timeouts)
    return heard


def _end_where_unfinished(
    s: Session, ids: Sequence[int], status: str, now: float, unstarted: bool = False
) -> list[int]:
    """End each execution still unfinished (and unstarted) now: one UPDATE each, so an execution
    another process ended meanwhile is left alone. Returns those ended here.

    In id order, as every write that stamps several executions locks them (PostgreSQL): in the
    order a query found them, a sweep and a pull of the same executions could deadlock."""
    ended: list[int] = []
    for eid in sorted(ids):
        where = [Execution.id == eid, Execution.status.in_(_UNFINISHED)]
        if unstarted:
            where.append(Execution.started_at.is_(None))
        result = s.execute(
            update(Execution)
            .where(*where)
            .values(status=status, finished_at=now, recorded_at=now)
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0):
            ended.append(eid)
    return ended


def _end(ex: Execution, status: str, now: float) -> None:
    ex.status = status
    ex.finished_at = now
    ex.recorded_at = now
