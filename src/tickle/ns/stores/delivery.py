"""The delivery store: runs now and their executions, the task servers' pulls of work, and the
status events that record each execution's progress."""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, get_args

import msgspec
from sqlalchemy import (
    ARRAY,
    Connection,
    Integer,
    Row,
    Select,
    Text,
    any_,
    bindparam,
    cast,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from tickle import messages as m
from tickle.ns import lifecycle, views
from tickle.ns.credentials import Caller
from tickle.ns.database import Database, retry_on_conflict
from tickle.ns.driver import Driver, DriverSql
from tickle.ns.errors import Conflict, NotFound
from tickle.ns.models import (
    Base,
    Computer,
    Execution,
    ExecutionOutput,
    ExecutionPull,
    Job,
    Run,
    Task,
    TaskServer,
)
from tickle.ns.models import StatusEvent as StatusEventRow
from tickle.ns.stores import bulk

log = logging.getLogger(__name__)
# the statuses of an execution not finished yet: named, so the work pull reads a computer's
# unfinished executions by `ix_executions_computer_status` (a NOT IN read its whole history)
_UNFINISHED = [s for s in get_args(m.ExecutionStatus) if s not in m.FINAL_STATUSES]
_PROGRESS_FIELDS = list(lifecycle.Progress._fields)
_Row = TypeVar("_Row", bound=Base)
_OUTPUT_FIELDS = {"stdout", "stderr"}
_BODY_OUTPUT = {"__all__": {"body": _OUTPUT_FIELDS}}  # pydantic-core's exclude: rows' bodies
_BODY_ENCODER = msgspec.json.Encoder()
_EXECUTIONS = Base.metadata.tables[Execution.__tablename__]
_COMPUTERS = Base.metadata.tables[Computer.__tablename__]
_EVENTS = Base.metadata.tables[StatusEventRow.__tablename__]
_OUTPUTS = Base.metadata.tables[ExecutionOutput.__tablename__]
_RUNS = Base.metadata.tables[Run.__tablename__]
_TASK_SERVERS = Base.metadata.tables[TaskServer.__tablename__]
_PULLS = Base.metadata.tables[ExecutionPull.__tablename__]
# what a pull gives of each execution (with its computer's name); its steps as their JSON text,
# read once per text (the executions of a run share theirs; a JSON load and a model validation
# per execution were most of a pull of 2,500)
_WORK_COLUMNS = [
    *(_EXECUTIONS.c[name] for name in ("id", "kind", "expires_at", "ts_pulled_at")),
    cast(_EXECUTIONS.c.steps, Text).label("steps"),
]
# what recording an event reads of its execution (the computer's columns come joined); its steps
# as JSON text, read once per text (see `_names`)
_EXEC_COLUMNS = [
    *(_EXECUTIONS.c[name] for name in ("id", "created_at", *_PROGRESS_FIELDS)),
    cast(_EXECUTIONS.c.steps, Text).label("steps"),
]
# the columns of a batch's events: their bodies serialized by pydantic or msgspec, whichever read
# them (`_body`; the JSON column's own json.dumps of a dict per event cost more than the rest of
# the insert); SQLite: in INSERTs of many rows; PostgreSQL: in one INSERT of one JSON document
# (see `bulk`)
_EVENT_VARYING = ["event_id", "execution_id", "kind", "at", "body"]
# SQLite: a batch's events in INSERTs of many rows that skip the ids recorded already and name
# those they inserted (as on PostgreSQL; a SELECT of the batch's ids before was one more statement
# per post), as SQL text with positional parameters: SQLAlchemy's insertmanyvalues built each row's
# parameters by name (`construct_params`, a fifth of the store's CPU in the ingest)
_SQLITE_EVENT_COLUMNS = (*_EVENT_VARYING, "recorded_at")
_SQLITE_EVENTS_PER_INSERT = 1000  # 6,000 parameters (SQLite allows 32,766)


@functools.cache
def _sqlite_insert_events(rows: int) -> str:
    """The SQL of one INSERT of `rows` events (see `_SQLITE_EVENT_COLUMNS`)."""
    row = "(" + ", ".join("?" * len(_SQLITE_EVENT_COLUMNS)) + ")"
    return (
        f"INSERT INTO {_EVENTS.name} ({', '.join(_SQLITE_EVENT_COLUMNS)}) "  # noqa: S608 (the model's names; values bound)
        f"VALUES {', '.join([row] * rows)} ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
    )


_PG_INSERT_EVENTS = bulk.insert(
    _EVENTS, _EVENT_VARYING, ["recorded_at"], returning=["event_id"], skip_conflicts_on="event_id"
)
# PostgreSQL: a run's executions in one INSERT of one JSON document of computers (see `bulk`)
_PG_INSERT_EXECUTIONS = bulk.insert(
    _EXECUTIONS,
    ["computer_id"],
    [
        "run_id",
        "task_id",
        "job_id",
        "kind",
        "steps",
        "status",
        "step_results",
        "created_at",
        "expires_at",
    ],
    returning=["id", "computer_id"],
)
# SQLite: likewise one INSERT of the computers as one JSON array (`json_each`), the other columns
# the same in every row and bound once, `steps` and `step_results` as JSON text written once: an
# executemany bound every row's parameters and wrote each row's steps to JSON again (a run-now
# on 10,000 computers: 0.6 s before its commit, the first tickle waiting for it)
_SQLITE_EXECUTION_FIXED = (
    "run_id", "task_id", "job_id", "kind", "steps", "status", "step_results", "created_at",
    "expires_at",
)  # fmt: skip
_SQLITE_INSERT_EXECUTIONS = (
    f"INSERT INTO {_EXECUTIONS.name} ({', '.join(_SQLITE_EXECUTION_FIXED)}, computer_id) "  # noqa: S608 (the model's names; values bound)
    f"SELECT {', '.join('?' * len(_SQLITE_EXECUTION_FIXED))}, value FROM json_each(?) "
    "ORDER BY key RETURNING id, computer_id"
)
# PostgreSQL: a batch's step outputs in one statement (an executemany was one per output)
_PG_KEEP_OUTPUTS = bulk.insert(
    _OUTPUTS,
    ["execution_id", "step", "stdout", "stderr"],
    replace_on=["execution_id", "step"],
)
_PG_INSERT_PULLS = bulk.insert(_PULLS, ["execution_id"], ["task_server_id", "pulled_at"])
_PG_UPDATE_PROGRESS = bulk.update(_EXECUTIONS, "id", _PROGRESS_FIELDS)
# SQLite: the progress of many executions in one executemany of SQL text with positional
# parameters (SQLAlchemy's executemany built each row's parameters by name, and its JSON type
# serialized `step_results` once more)
_SQLITE_UPDATE_PROGRESS = (
    f"UPDATE {_EXECUTIONS.name} SET {', '.join(f'{name} = ?' for name in _PROGRESS_FIELDS)} "  # noqa: S608 (the model's names; values bound)
    "WHERE id = ?"
)


# what recording events reads of their executions (`ids`), locking them in id order, with whether
# the task server reporting them (`ts_id`) was given each by a pull (`pulled`); built once (a
# select built per batch cost more than its execution)
# The computer's columns and the pull come as subqueries of each execution, looked up by their
# primary keys: joined, PostgreSQL's planner hashed every computer and every pull of the task
# server to match a batch of a few dozen executions (a scan of the fleet per batch)
_OF_COMPUTER = _COMPUTERS.c.id == _EXECUTIONS.c.computer_id
_READ_FOR_EVENTS = (
    select(
        *_EXEC_COLUMNS,
        select(_COMPUTERS.c.task_server_id)
        .where(_OF_COMPUTER)
        .scalar_subquery()
        .label("task_server_id"),
        select(_COMPUTERS.c.name).where(_OF_COMPUTER).scalar_subquery().label("name"),
        select(_PULLS.c.execution_id)
        .where(
            _PULLS.c.execution_id == _EXECUTIONS.c.id,
            _PULLS.c.task_server_id == bindparam("ts_id"),
        )
        .scalar_subquery()
        .label("pulled"),
    )
    .order_by(_EXECUTIONS.c.id)
    .with_for_update(of=_EXECUTIONS)
)
_PG_READ_FOR_EVENTS = _READ_FOR_EVENTS.where(
    _EXECUTIONS.c.id == any_(cast(bindparam("ids"), ARRAY(Integer)))
)
_SQLITE_READ_FOR_EVENTS = _READ_FOR_EVENTS.where(
    _EXECUTIONS.c.id.in_(bindparam("ids", expanding=True))
)


# a pull: its stamps on its task server (`ts_id`), and every unfinished execution of the task
# server's clients with whether a pull gave it to this task server before (`given`); built once
_STAMP_PULL = (
    update(_TASK_SERVERS)
    .where(_TASK_SERVERS.c.id == bindparam("ts_id"))
    .values(last_pull_at=bindparam("now"))
)
_STAMP_TICKLE_PULL = _STAMP_PULL.values(tickle_pulled_at=bindparam("now"))
_READ_WORK = (
    select(*_WORK_COLUMNS, _COMPUTERS.c.name, _PULLS.c.execution_id.label("given"))
    .select_from(
        _EXECUTIONS.join(_COMPUTERS).outerjoin(
            _PULLS,
            (_PULLS.c.execution_id == _EXECUTIONS.c.id)
            & (_PULLS.c.task_server_id == bindparam("ts_id")),
        )
    )
    .where(_COMPUTERS.c.task_server_id == bindparam("ts_id"), _EXECUTIONS.c.status.in_(_UNFINISHED))
    .order_by(_EXECUTIONS.c.id)
)


# SQLite: a pull's statements by the driver (see `driver`): each the Core one, compiled once
_DRIVER_STAMP_PULL = DriverSql(_STAMP_PULL)
_DRIVER_STAMP_TICKLE_PULL = DriverSql(_STAMP_TICKLE_PULL)
_DRIVER_READ_WORK = DriverSql(_READ_WORK)
_DRIVER_INSERT_PULLS = (
    f"INSERT INTO {_PULLS.name} (execution_id, task_server_id, pulled_at) VALUES (?, ?, ?)"  # noqa: S608 (the model's names; values bound)
)


class _WorkRow(NamedTuple):
    """A row of `_READ_WORK`."""

    id: int
    kind: str
    expires_at: float | None
    ts_pulled_at: float | None
    steps: str
    name: str
    given: int | None


Cancels = Callable[[Connection | Driver], list[int]]
"""Reads the executions a pull must tell its task server are cancelled, in the pull's transaction
(a Core connection, or SQLite's driver's: see `cancel.cancelled_for`)."""

AlsoInRun = Callable[[Connection | Driver, m.RunOut], None]
"""Writes made in a run-now's own transaction (Core's, or on SQLite its driver's), given the run
(see `DeliveryStore.create_run`)."""


# `column IN :ids` built once: a statement built per call cost more than running it (its
# construction and cache key were most of a pull's 1.7 ms). PostgreSQL: `= ANY` of one array
# (thousands of placeholders cost psycopg more to parse than the statement costs to run).
_IDS_SQLITE = _EXECUTIONS.c.id.in_(bindparam("ids", expanding=True))
_IDS_PG = _EXECUTIONS.c.id == any_(cast(bindparam("ids", type_=ARRAY(Integer)), ARRAY(Integer)))
_SET_TS_PULLED = {
    pg: update(_EXECUTIONS).where(ids).values(ts_pulled_at=bindparam("now"))
    for pg, ids in ((False, _IDS_SQLITE), (True, _IDS_PG))
}
_DRIVER_SET_TS_PULLED = DriverSql(_SET_TS_PULLED[False])
_LOCK_EXECUTIONS = (
    select(_EXECUTIONS.c.id).where(_IDS_PG).order_by(_EXECUTIONS.c.id).with_for_update()
)
_SQLITE_OUTPUTS = sqlite_insert(_OUTPUTS)
_SQLITE_KEEP_OUTPUTS = _SQLITE_OUTPUTS.on_conflict_do_update(
    index_elements=[_OUTPUTS.c.execution_id, _OUTPUTS.c.step],
    set_={"stdout": _SQLITE_OUTPUTS.excluded.stdout, "stderr": _SQLITE_OUTPUTS.excluded.stderr},
)
_INSERT_RUN = insert(_RUNS).returning(_RUNS.c.id)
# the work a tasks tickle first sent at :sent_at was for (see `_mark_tickle_sent`): the
# executions of the task server's clients (by :ts_id or by :ts_name) not stamped yet, created
# before it, and not pulled before it
_CLIENTS_OF = {
    "ts_id": select(_COMPUTERS.c.id).where(_COMPUTERS.c.task_server_id == bindparam("ts_id")),
    "ts_name": select(_COMPUTERS.c.id)
    .join(_TASK_SERVERS, _COMPUTERS.c.task_server_id == _TASK_SERVERS.c.id)
    .where(_TASK_SERVERS.c.name == bindparam("ts_name")),
}
_TICKLED_WORK = {
    key: (
        _EXECUTIONS.c.computer_id.in_(clients.scalar_subquery()),
        _EXECUTIONS.c.tickle_sent_at.is_(None),
        _EXECUTIONS.c.created_at <= bindparam("sent_at"),
        or_(
            _EXECUTIONS.c.ts_pulled_at.is_(None), _EXECUTIONS.c.ts_pulled_at >= bindparam("sent_at")
        ),
    )
    for key, clients in _CLIENTS_OF.items()
}
_STAMP_TICKLED = {
    key: update(_EXECUTIONS).where(*covered).values(tickle_sent_at=bindparam("sent_at"))
    for key, covered in _TICKLED_WORK.items()
}
_LOCK_TICKLED = {
    key: select(_EXECUTIONS.c.id)
    .where(*covered)
    .order_by(_EXECUTIONS.c.id)
    .with_for_update(of=_EXECUTIONS)
    for key, covered in _TICKLED_WORK.items()
}
_DRIVER_STAMP_TICKLED = DriverSql(_STAMP_TICKLED["ts_id"])
_STAMP_TICKLED_IDS = update(_EXECUTIONS).where(_IDS_PG).values(tickle_sent_at=bindparam("sent_at"))

# the computers a run-now may name (not forgotten), with their task server's name; built once
# (building this select, its join above all, cost a run-now more than running it). Their groups
# only for a run on groups (a JSON load per computer: 95 ms of a run-now on 5,000 computers)
_UNFORGOTTEN = (
    select(_COMPUTERS.c.id, _COMPUTERS.c.name, _TASK_SERVERS.c.name.label("task_server"))
    .select_from(_COMPUTERS.outerjoin(_TASK_SERVERS))
    .where(_COMPUTERS.c.forgotten_at.is_(None))
)
_UNFORGOTTEN_BY_NAME = _UNFORGOTTEN.order_by(_COMPUTERS.c.name)
_GROUPED_BY_NAME = _UNFORGOTTEN.add_columns(_COMPUTERS.c.groups).order_by(_COMPUTERS.c.name)
_UNFORGOTTEN_NAMED = _UNFORGOTTEN.where(_COMPUTERS.c.name.in_(bindparam("names", expanding=True)))
# a task as a run-now snapshots it (`id`); built once
_TASKS = Base.metadata.tables[Task.__tablename__]
_TASK_BY_ID = select(
    *(_TASKS.c[name] for name in ("id", "name", "command", "script", "timeout_s"))
).where(_TASKS.c.id == bindparam("id"))
# SQLite: a run-now's statements by the driver (see `driver`)
_DRIVER_UNFORGOTTEN = {
    statement: DriverSql(statement)
    for statement in (_UNFORGOTTEN_BY_NAME, _GROUPED_BY_NAME, _UNFORGOTTEN_NAMED)
}
_DRIVER_TASK_BY_ID = DriverSql(_TASK_BY_ID)
_JOBS = Base.metadata.tables[Job.__tablename__]
_JOB_TASKS = Base.metadata.tables["job_tasks"]
_DRIVER_JOB_NAME = DriverSql(select(_JOBS.c.name).where(_JOBS.c.id == bindparam("id")))
_DRIVER_JOB_TASKS = DriverSql(
    select(*(_TASKS.c[name] for name in ("id", "name", "command", "script", "timeout_s")))
    .join(_JOB_TASKS, _JOB_TASKS.c.task_id == _TASKS.c.id)
    .where(_JOB_TASKS.c.job_id == bindparam("id"))
    .order_by(_JOB_TASKS.c.position)
)
_DRIVER_INSERT_RUN = DriverSql(_INSERT_RUN)
# which of some event ids are recorded (`ids`); built once
_RECORDED_EVENTS = select(_EVENTS.c.event_id).where(
    _EVENTS.c.event_id.in_(bindparam("ids", expanding=True))
)


@dataclass(frozen=True, slots=True)
class PendingTickle:
    """A task server with untickled pending work, and when the newest of it was created."""

    task_server: str
    newest_created_at: float


@dataclass(slots=True)
class EventOutcome:
    """What recording a batch of status events did."""

    accepted: list[str]
    recorded: list[lifecycle.Event]  # newly recorded now
    run_now_to_recorded: list[float]  # latencies of executions finished now
    finished: list[str]  # their final statuses


class DeliveryStore:
    """Runs, executions, pulls and status events in the NS database."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def create_run(self, body: m.RunCreate, also: AlsoInRun | None = None) -> m.RunOut:
        """Run now: one pending execution per selected computer (named or in a named group).

        `also`: more writes in the run's transaction, given the run (its audit row)."""
        now = time.time()
        if self._db.dialect == "sqlite":  # by its driver (see `driver`): the run's first hop
            with self._db.writing_driver() as db:
                return _create_run(db, body, also, now, _steps_driver(db, body))
        with self._db.writing() as s:
            return _create_run(s.connection(), body, also, now, _steps(s, body))

    def rerun_of(self, run_id: int, failed: bool) -> m.RunCreate:
        """A run of `run_id`'s task, job or ad-hoc command again, on its computers (`failed`:
        those whose execution did not succeed; a forgotten computer is left out)."""
        with self._db.reading() as s:
            run = _get(s, Run, run_id, "run")
            targets = sorted(
                {
                    e.computer.name
                    for e in run.executions
                    if e.computer.forgotten_at is None
                    and (not failed or e.status in m.RERUN_STATUSES)
                }
            )
            if not targets:
                what = "none failed" if failed else "all are forgotten"
                raise Conflict(f"run {run_id} has no computer to run again ({what})")
            if run.task_id is not None or run.job_id is not None:
                return m.RunCreate(task_id=run.task_id, job_id=run.job_id, computers=targets)
            if not run.executions:
                raise Conflict(f"run {run_id} has no execution to take its command from")
            # an ad-hoc command: its task lives in its executions only
            spec = m.TaskSpec.model_validate(run.executions[0].steps[0])
            return m.RunCreate(task=spec, computers=targets)

    def run(self, run_id: int) -> m.RunOut:
        with self._db.reading() as s:
            return views.run_out(_get(s, Run, run_id, "run"))

    def execution(self, execution_id: int) -> m.ExecutionOut:
        with self._db.reading() as s:
            return views.execution_out(_get(s, Execution, execution_id, "execution"))

    def pull_work(
        self,
        ts: Caller,
        now: float,
        via: m.TsPullVia,
        tickle_sent_at: float | None = None,
        cancels: Cancels | None = None,
    ) -> m.WorkOut:
        """Every unfinished execution of this task server's clients; stamps the first pull and
        remembers that this task server was given each of them (see `record_events`).

        Every pull stamps `last_pull_at`; only one a tickle caused stamps `tickle_pulled_at`
        (the acknowledgement another NS process sees). `tickle_sent_at`: first stamps the work
        of the tickle first sent then, as `mark_tickle_sent` does, in the same transaction.
        `cancels`: reads the executions listed as cancelled (`WorkOut.cancel`), in it too."""
        # a concurrent pull of the same task server (another NS process) may note a pair first
        return retry_on_conflict(lambda: self._pull_work(ts, now, via, tickle_sent_at, cancels))

    def record_events(
        self, ts: Caller, events: Sequence[lifecycle.Event], now: float
    ) -> EventOutcome:
        """Record each event exactly once (by event id) and apply it to its execution.

        A task server may report an execution of its client now, or one a pull gave it before
        the computer moved away (it may hold that execution's events from before the move); the
        event must name the execution's computer. Other events are left out of `accepted`.
        """
        # another process may record one of these ids between our check and our commit
        return retry_on_conflict(lambda: self._record(ts, events, now))

    # --- the tickle server's view --------------------------------------------------------------

    def pending_tickles(self, taking_over: bool = False) -> list[PendingTickle]:
        """Task servers with pending executions that were neither tickled for nor pulled yet.

        `taking_over` (a dispatcher's first pass): with any pending execution, tickled or pulled
        or not. The tickles of the dispatcher before died with it, and so may have the answer to
        a pull it had committed as `ts_pulled_at`: the task server that never got it would wait
        for its retry; one that got it finds nothing new in the pull the tickle causes."""
        unpulled = [Execution.status == "pending"]
        if not taking_over:
            unpulled += [Execution.ts_pulled_at.is_(None), Execution.tickle_sent_at.is_(None)]
        with self._db.reading() as s:
            rows = s.execute(
                select(TaskServer.name, func.max(Execution.created_at))
                .select_from(Execution)
                .join(Computer, Execution.computer_id == Computer.id)
                .join(TaskServer, Computer.task_server_id == TaskServer.id)
                .where(*unpulled)
                .group_by(TaskServer.name)
            )
            return [PendingTickle(name, float(newest)) for name, newest in rows]

    def mark_tickle_sent(self, task_server: str, sent_at: float) -> int:
        """Stamp `tickle_sent_at` on the work that tickle was for; returns how many."""
        with self._db.writing_core() as conn:
            return _mark_tickle_sent(conn, "ts_name", task_server, sent_at)

    # --- helpers -------------------------------------------------------------------------------

    def _pull_work(
        self,
        ts: Caller,
        now: float,
        via: m.TsPullVia,
        tickle_sent_at: float | None,
        cancels: Cancels | None,
    ) -> m.WorkOut:
        # SQLite: its driver (see `driver`); PostgreSQL: SQLAlchemy Core (no ORM object per
        # execution: their loading and flush were most of a pull's 3 ms)
        if self._db.dialect != "postgresql":
            return self._pull_work_driver(ts, now, via, tickle_sent_at, cancels)
        stamp = _STAMP_TICKLE_PULL if via == "tickle" else _STAMP_PULL
        acked_first = via == "tickle"
        if acked_first:
            # the acknowledgement committed before the work is read, as a pull served in the
            # dispatcher's own process acks before it reads: the dispatcher (maybe another
            # process) looks for it before each resend, and a pull of thousands of executions
            # outlasted the first resend's delay (the resend brought a second pull of them all)
            with self._db.writing_core() as conn:
                conn.execute(stamp, {"ts_id": ts.id, "now": now})
        with self._db.writing_core() as conn:
            if tickle_sent_at is not None:  # before `ts_pulled_at`, which it compares with
                _mark_tickle_sent(conn, "ts_id", ts.id, tickle_sent_at)
            if not acked_first:
                conn.execute(stamp, {"ts_id": ts.id, "now": now})
            rows = conn.execute(_READ_WORK, {"ts_id": ts.id}).all()
            # the ids read, not a condition: an execution committed since was not given here
            unpulled = [row.id for row in rows if row.ts_pulled_at is None]
            if unpulled:
                # lock them in id order first, as `_record` does: an UPDATE of many rows locks
                # them in its scan's order, and two pulls (two NS processes) could deadlock
                conn.execute(_LOCK_EXECUTIONS, {"ids": unpulled}).all()
                conn.execute(_SET_TS_PULLED[True], {"ids": unpulled, "now": now})
            new = [row.id for row in rows if row.given is None]
            if new:
                conn.execute(
                    _PG_INSERT_PULLS,
                    {
                        "rows": bulk.rows([{"execution_id": i} for i in new]),
                        "task_server_id": ts.id,
                        "pulled_at": now,
                    },
                )
            return _work_out(rows, [] if cancels is None else cancels(conn))

    def _pull_work_driver(
        self,
        ts: Caller,
        now: float,
        via: m.TsPullVia,
        tickle_sent_at: float | None,
        cancels: Cancels | None,
    ) -> m.WorkOut:
        """`_pull_work` on SQLite, by its driver: the same statements in one transaction."""
        ids = {"ts_id": ts.id, "now": now}
        with self._db.writing_driver() as db:
            if tickle_sent_at is not None:  # before `ts_pulled_at`, which it compares with
                _DRIVER_STAMP_TICKLED.execute(db, {"ts_id": ts.id, "sent_at": tickle_sent_at})
            (_DRIVER_STAMP_TICKLE_PULL if via == "tickle" else _DRIVER_STAMP_PULL).execute(db, ids)
            rows = [_WorkRow(*row) for row in _DRIVER_READ_WORK.execute(db, ids)]
            # the ids read, not a condition: an execution committed since was not given here
            unpulled = [row.id for row in rows if row.ts_pulled_at is None]
            if unpulled:
                _DRIVER_SET_TS_PULLED.execute(db, {"ids": unpulled, "now": now})
            new = [(row.id, ts.id, now) for row in rows if row.given is None]
            if new:
                db.executemany(_DRIVER_INSERT_PULLS, new)
            return _work_out(rows, [] if cancels is None else cancels(db))

    def _record(self, ts: Caller, events: Sequence[lifecycle.Event], now: float) -> EventOutcome:
        # SQLAlchemy Core throughout: no ORM object per execution or per event (the profile had
        # half of the ingest in the ORM's loading, attribute tracking and flush)
        out = EventOutcome(accepted=[], recorded=[], run_now_to_recorded=[], finished=[])
        with self._db.writing_core() as conn:
            postgresql = conn.dialect.name == "postgresql"
            exec_ids = sorted({e.execution_id for e in events})
            # PostgreSQL: lock the executions first (in id order: no deadlock), so another NS
            # process recording events of the same executions waits for this commit instead of
            # overwriting it with what it read before (a `started` reopening a finished one);
            # the event ids are checked after the lock, so a batch recorded meanwhile is seen.
            # Whether this task server was given each (`pulled`) comes joined.
            read = _PG_READ_FOR_EVENTS if postgresql else _SQLITE_READ_FOR_EVENTS
            execs = {
                row.id: row for row in conn.execute(read, {"ts_id": ts.id, "ids": exec_ids}).all()
            }
            rows: dict[str, dict[str, Any]] = {}  # the events to record, by id (first of each)
            refused: list[lifecycle.Event] = []
            for e in events:
                ex = execs.get(e.execution_id)
                if ex is None or e.event_id in rows:
                    continue
                if (ex.task_server_id != ts.id and ex.pulled is None) or ex.name != e.computer:
                    refused.append(e)
                    continue
                rows[e.event_id] = {
                    "event_id": e.event_id,
                    "execution_id": ex.id,
                    "kind": e.kind,
                    "at": e.at,
                    # the output is kept once, in its step's row (`execution_outputs`): left out
                    # of the body (SQLite: here; PostgreSQL: as the rows are written, see `bulk`)
                    "body": _body(e, postgresql),
                    "recorded_at": now,
                }
            new = _insert_new_events(conn, list(rows.values()), now)
            # an event refused now counts as accepted if it was recorded before
            recorded_before = _recorded_events(conn, [e.event_id for e in refused])
            step_names: dict[str, list[str]] = {}  # by the steps' JSON text
            initial: dict[int, lifecycle.Progress] = {}  # as each execution was read
            progress: dict[int, lifecycle.Progress] = {}  # as the events leave each execution
            outputs: list[dict[str, Any]] = []
            for e in events:
                ex = execs.get(e.execution_id)
                if ex is None:
                    log.warning(
                        "status event %s from %s for unknown execution %d: ignored",
                        e.event_id, ts.name, e.execution_id,
                    )  # fmt: skip
                    out.accepted.append(e.event_id)
                    continue
                if e.event_id not in rows:  # refused (or a repeat of a refused one)
                    if e.event_id in recorded_before:
                        out.accepted.append(e.event_id)
                        continue
                    log.warning(
                        "status event %s from %s refused: execution %d is for %s (event says %s),"
                        " neither a client of this task server nor pulled by it",
                        e.event_id, ts.name, ex.id, ex.name, e.computer,
                    )  # fmt: skip
                    continue
                out.accepted.append(e.event_id)
                if e.event_id not in new:  # recorded before, or earlier in this batch
                    continue
                new.discard(e.event_id)
                output = _output_row(ex.id, e)
                if output is not None:
                    outputs.append(output)
                if ex.id not in initial:
                    initial[ex.id] = _progress(ex)
                before = progress.get(ex.id, initial[ex.id])
                after = lifecycle.apply(before, e, now, _names(step_names, ex.steps))
                progress[ex.id] = after
                if lifecycle.finished_now(before, after):
                    out.run_now_to_recorded.append(max(0.0, now - ex.created_at))
                    out.finished.append(after.status)
                out.recorded.append(e)
            _keep_outputs(conn, outputs)
            moved = [(ex_id, after) for ex_id, after in progress.items() if after != initial[ex_id]]
            if moved and postgresql:  # one UPDATE from one JSON document (see `bulk`)
                changed = [_progress_params(ex_id, after) for ex_id, after in moved]
                conn.execute(_PG_UPDATE_PROGRESS, {"rows": bulk.rows(changed)})
            elif moved:  # one UPDATE executed for the many executions this batch moved
                conn.exec_driver_sql(
                    _SQLITE_UPDATE_PROGRESS, [_sqlite_progress(ex_id, p) for ex_id, p in moved]
                )
        return out


def _mark_tickle_sent(conn: Connection, key: str, task_server: int | str, sent_at: float) -> int:
    """Stamp `tickle_sent_at` on the work of the tickle first sent at `sent_at` to the task
    server `task_server` (its id, `key` "ts_id", or its name, "ts_name"): its clients'
    executions not stamped yet, created before it, and not pulled before it. Returns how many."""
    params: dict[str, Any] = {key: task_server, "sent_at": sent_at}
    if conn.dialect.name == "postgresql":
        # lock them in id order first, as a pull and `_record` do: this UPDATE alone
        # locks them in its scan's order, and the pull the tickle caused, stamping the
        # same rows at once, deadlocked with it (the pull, already taken as the tickle's
        # acknowledgement, failed: its task server waited for its periodic check)
        ids = list(conn.scalars(_LOCK_TICKLED[key], params))
        if not ids:
            return 0
        result = conn.execute(_STAMP_TICKLED_IDS, {"ids": ids, "sent_at": sent_at})
    else:
        result = conn.execute(_STAMP_TICKLED[key], params)
    return int(getattr(result, "rowcount", 0) or 0)


def _insert_new_events(conn: Connection, rows: list[dict[str, Any]], now: float) -> set[str]:
    """Insert the events (unique ids) not recorded yet; return the ids inserted."""
    if not rows:
        return set()
    if conn.dialect.name == "postgresql":
        # one INSERT that skips the ids recorded already (by another process, waiting for its
        # commit) and names those it inserted: no lookup before
        params = {"rows": bulk.rows(rows, _BODY_OUTPUT), "recorded_at": now}
        return set(conn.execute(_PG_INSERT_EVENTS, params).scalars().all())
    inserted: set[str] = set()
    for start in range(0, len(rows), _SQLITE_EVENTS_PER_INSERT):
        chunk = rows[start : start + _SQLITE_EVENTS_PER_INSERT]
        values = tuple(row[name] for row in chunk for name in _SQLITE_EVENT_COLUMNS)
        inserted.update(
            conn.exec_driver_sql(_sqlite_insert_events(len(chunk)), values).scalars().all()
        )
    return inserted


def _recorded_events(conn: Connection, event_ids: list[str]) -> set[str]:
    """Which of these event ids are recorded."""
    if not event_ids:
        return set()
    return set(conn.scalars(_RECORDED_EVENTS, {"ids": event_ids}))


def _names(known: dict[str, list[str]], steps: str) -> list[str]:
    """The step names of an execution's steps (their JSON text), remembered in `known`."""
    names = known.get(steps)
    if names is None:
        names = known[steps] = [step["name"] for step in json.loads(steps)]
    return names


def _work_out(rows: Sequence[Any], cancel: list[int]) -> m.WorkOut:
    """A pull's answer: the work of `rows` (of `_READ_WORK`), each execution's steps read once
    per text (the executions of a run share theirs)."""
    steps: dict[str, list[m.TaskSpec]] = {}
    return m.WorkOut(
        executions=[
            views.execution_work(row, steps.get(row.steps) or _steps_of(steps, row.steps))
            for row in rows
        ],
        cancel=cancel,
    )


def _steps_of(known: dict[str, list[m.TaskSpec]], text: str) -> list[m.TaskSpec]:
    """The steps of an execution's JSON text, remembered in `known`."""
    steps = known[text] = [m.TaskSpec.model_validate(step) for step in json.loads(text)]
    return steps


def _output_row(execution_id: int, e: lifecycle.Event) -> dict[str, Any] | None:
    """The step output an event carries, as its `execution_outputs` row (None: it carries none)."""
    if e.step is None or (e.stdout is None and e.stderr is None):
        return None
    # PostgreSQL keeps no NUL in text (agents send none; a foreign one might)
    stdout, stderr = ((text or "").replace("\x00", "\ufffd") for text in (e.stdout, e.stderr))
    return {"execution_id": execution_id, "step": e.step, "stdout": stdout, "stderr": stderr}


def _body(e: lifecycle.Event, postgresql: bool) -> Any:
    """An event's row body: the event without its step's output (kept once, in its step's row).
    SQLite: its JSON text; PostgreSQL: the event, left out of the rows' JSON document there (see
    `_BODY_OUTPUT`). An event the fast path read (msgspec) becomes the JSON a pydantic one writes
    (every field but the output, non-finite times as null)."""
    if isinstance(e, m.StatusEvent):
        return e if postgresql else e.model_dump_json(exclude=_OUTPUT_FIELDS)
    if postgresql:
        return msgspec.structs.asdict(e)
    fields = msgspec.structs.asdict(e)
    del fields["stdout"], fields["stderr"]
    return _BODY_ENCODER.encode(fields).decode()


def _keep_outputs(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Keep the steps' outputs (a step reported again replaces it: the last one wins)."""
    last = list({(r["execution_id"], r["step"]): r for r in rows}.values())  # one row per key
    if not last:
        return
    # the NS runs on SQLite or PostgreSQL only (its settings refuse any other database)
    if conn.dialect.name == "postgresql":
        conn.execute(_PG_KEEP_OUTPUTS, {"rows": bulk.rows(last)})
    else:
        conn.execute(_SQLITE_KEEP_OUTPUTS, last)


def _steps(s: Session, body: m.RunCreate) -> tuple[str, list[dict[str, Any]], str]:
    """The run's kind, its steps (task snapshots) and its label (what it ran, by name)."""
    if body.task is not None:  # an ad-hoc command: its task lives in the run only
        return "task", [body.task.model_dump(mode="json")], body.task.name
    if body.task_id is not None:
        # a Core row: the ORM's identity-map load of a Task cost a run-now more than its read
        task = s.connection().execute(_TASK_BY_ID, {"id": body.task_id}).first()
        if task is None:
            raise NotFound(f"task {body.task_id} does not exist")
        return "task", [views.task_spec(task)], task.name
    job = _get(s, Job, body.job_id, "job")
    by_id = {
        t.id: t for t in s.scalars(select(Task).where(Task.id.in_(jt.task_id for jt in job.tasks)))
    }
    return "job", [views.task_spec(by_id[jt.task_id]) for jt in job.tasks], job.name


def _steps_driver(db: Driver, body: m.RunCreate) -> tuple[str, list[dict[str, Any]], str]:
    """`_steps` by SQLite's driver."""
    if body.task is not None:
        return "task", [body.task.model_dump(mode="json")], body.task.name
    if body.task_id is not None:
        task = _DRIVER_TASK_BY_ID.execute(db, {"id": body.task_id}).fetchone()
        if task is None:
            raise NotFound(f"task {body.task_id} does not exist")
        return "task", [_driver_task_spec(task)], task[1]
    job = _DRIVER_JOB_NAME.execute(db, {"id": body.job_id}).fetchone()
    if job is None:
        raise NotFound(f"job {body.job_id} does not exist")
    tasks = _DRIVER_JOB_TASKS.execute(db, {"id": body.job_id}).fetchall()
    return "job", [_driver_task_spec(task) for task in tasks], job[0]


def _driver_task_spec(task: tuple[Any, ...]) -> dict[str, Any]:
    """`views.task_spec` of a row of `_TASK_BY_ID` (or `_JOB_TASKS`) by the driver (its
    command as JSON text)."""
    _, name, command, script, timeout_s = task
    command = None if command is None else json.loads(command)
    spec = m.TaskSpec(name=name, command=command, script=script, timeout_s=timeout_s)
    return spec.model_dump(mode="json")


def _create_run(
    conn: Connection | Driver,
    body: m.RunCreate,
    also: AlsoInRun | None,
    now: float,
    what: tuple[str, list[dict[str, Any]], str],
) -> m.RunOut:
    """`create_run` in its transaction (`conn`: Core's, or SQLite's driver's); `what`: its
    kind, steps and label (`_steps`)."""
    kind, steps, label = what
    targets = _targets(conn, body)
    expires_at = None if body.expires_in_s is None else now + body.expires_in_s
    run = {"task_id": body.task_id, "job_id": body.job_id, "created_at": now}
    made_run = run | {"label": label, "expires_at": expires_at}
    if isinstance(conn, Driver):
        run_id = int(_DRIVER_INSERT_RUN.execute(conn, made_run | {"id": None}).fetchone()[0])
    else:
        run_id = int(conn.execute(_INSERT_RUN, made_run).scalar_one())
    # one statement on either database (`_PG_INSERT_EXECUTIONS`, `_SQLITE_INSERT_EXECUTIONS`):
    # the ORM's flush of one object per execution cost 150 µs a computer (10,000: 1.5 s), an
    # executemany still 60 µs
    execution = run | {
        "run_id": run_id,
        "kind": kind,
        "steps": steps,
        "status": "pending",
        "step_results": [],
        "expires_at": expires_at,
    }
    by_computer = {t.id: t for t in targets}
    rows: Sequence[Any] = []
    if not by_computer:
        pass
    elif isinstance(conn, Driver):
        fixed = execution | {"steps": json.dumps(steps), "step_results": "[]"}
        rows = conn.execute(
            _SQLITE_INSERT_EXECUTIONS,
            (*(fixed[c] for c in _SQLITE_EXECUTION_FIXED), json.dumps(list(by_computer))),
        ).fetchall()
    else:
        json_columns = {"steps": bulk.json_text(steps), "step_results": "[]"}
        rows = conn.execute(
            _PG_INSERT_EXECUTIONS,
            execution
            | json_columns
            | {"rows": bulk.rows([{"computer_id": c} for c in by_computer])},
        ).all()
    made = sorted((int(row[0]), int(row[1])) for row in rows)  # a run's order: by id
    timeline = views.new_timeline(now)
    out = m.RunOut(
        id=run_id,
        created_at=now,
        task_id=body.task_id,
        job_id=body.job_id,
        label=label,
        expires_at=expires_at,
        executions=[
            views.new_execution_out(
                execution_id,
                run_id,
                by_computer[computer_id].name,
                by_computer[computer_id].task_server,
                timeline,
                expires_at,
            )
            for execution_id, computer_id in made
        ],
    )
    if also is not None:
        also(conn, out)
    return out


class _Target(NamedTuple):
    """A computer a run may be for (a row of `_UNFORGOTTEN` by the driver; `groups` read)."""

    id: int
    name: str
    task_server: str | None
    groups: list[str] | None = None


def _computers(
    conn: Connection | Driver, statement: Select[Any], params: dict[str, Any]
) -> list[Any]:
    """The rows of one of the `_UNFORGOTTEN` selects (by SQLite's driver: `_Target`s)."""
    if not isinstance(conn, Driver):
        return list(conn.execute(statement, params))
    grouped = statement is _GROUPED_BY_NAME
    return [
        _Target(row[0], row[1], row[2], json.loads(row[3]) if grouped and row[3] else None)
        for row in _DRIVER_UNFORGOTTEN[statement].execute(conn, params)
    ]


def _targets(conn: Connection | Driver, body: m.RunCreate) -> list[Any]:
    """The computers a run is for: id, name, task_server (its name, or None)."""
    # Core rows: an ORM Computer (with its task server joined) per target cost more than the
    # insert of its execution
    chosen: dict[str, Any] = {}
    if body.all_computers:
        every = _computers(conn, _UNFORGOTTEN_BY_NAME, {})
        if not every:
            raise NotFound("no computer is registered")
        chosen.update((c.name, c) for c in every)
    if body.computers:
        names = list(dict.fromkeys(body.computers))
        found = {c.name: c for c in _computers(conn, _UNFORGOTTEN_NAMED, {"names": names})}
        missing = [n for n in names if n not in found]
        if missing:
            raise NotFound(f"unknown computer(s): {', '.join(missing)}")
        chosen.update((n, found[n]) for n in names)
    if body.groups:
        wanted = set(body.groups)
        matched: set[str] = set()
        # groups are a JSON list per computer: filtered here, portable across databases
        for c in _computers(conn, _GROUPED_BY_NAME, {}):
            hit = wanted.intersection(c.groups or [])
            if hit:
                matched |= hit
                chosen.setdefault(c.name, c)
        empty = [g for g in body.groups if g not in matched]
        if empty:
            raise NotFound(f"no computer in group(s): {', '.join(empty)}")
    return list(chosen.values())


def _get(s: Session, table: type[_Row], ident: int | None, what: str) -> _Row:
    row = s.get(table, ident)
    if row is None:
        raise NotFound(f"{what} {ident} does not exist")
    return row


def _progress(ex: Row[*tuple[Any, ...]]) -> lifecycle.Progress:
    values: dict[str, Any] = {name: getattr(ex, name) for name in _PROGRESS_FIELDS}
    values["step_results"] = tuple(ex.step_results or ())
    return lifecycle.Progress(**values)


def _progress_params(execution_id: int, progress: lifecycle.Progress) -> dict[str, Any]:
    """A row of `_PG_UPDATE_PROGRESS` for one execution."""
    values: dict[str, Any] = progress._asdict()
    values["step_results"] = list(progress.step_results)
    values["id"] = execution_id
    return values


def _sqlite_progress(execution_id: int, progress: lifecycle.Progress) -> tuple[Any, ...]:
    """The parameters of `_SQLITE_UPDATE_PROGRESS` for one execution (`step_results` as the
    JSON text SQLAlchemy's JSON type writes)."""
    values = progress._asdict()
    values["step_results"] = json.dumps(list(progress.step_results))
    return (*(values[name] for name in _PROGRESS_FIELDS), execution_id)
