"""The notification server's store: every read and write of its database, in short transactions.

SQLite (WAL) is the embedded default; any SQLAlchemy URL works (PostgreSQL via psycopg), so several
NS API processes can share one database. Methods are synchronous: the API calls them from its
threadpool and the tickle server from an executor, never on the event loop.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, func, or_, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from tickle import messages as m
from tickle.ns import lifecycle, migrations
from tickle.ns.models import (
    Computer,
    Execution,
    ExecutionPull,
    Job,
    JobTask,
    Run,
    Settings,
    Task,
    TaskServer,
)
from tickle.ns.models import StatusEvent as StatusEventRow

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# the execution column holding each timeline step's time
_TIMELINE_COLUMNS = {step: f"{step}_at" for step in m.TIMELINE_STEPS} | {
    "cached_at_ts": "cached_at_ts"
}
_FINAL = m.FINAL_STATUSES
_PROGRESS_FIELDS = [f.name for f in fields(lifecycle.Progress)]
DISPATCHER_LOCK_KEY = 0x7469636B6C65_02  # "tickle" + 2: the one active tickle dispatcher


class NotFound(Exception):
    """An object named in a request does not exist (HTTP 404)."""


class Forbidden(Exception):
    """A valid credential touching something it may not (HTTP 403)."""


class Conflict(Exception):
    """The request clashes with what exists (HTTP 409)."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a bearer token belongs to."""

    role: str  # task_server | computer
    name: str
    id: int


@dataclass(frozen=True, slots=True)
class TaskServerLink:
    """What the tickle server needs to tickle a task server and to see its pulls."""

    name: str
    addr: tuple[str, int]
    key: bytes
    tickle_pulled_at: float | None  # the last work pull a tickle caused
    settings_pulled_at: float | None  # the last settings pull a tickle caused


@dataclass(frozen=True, slots=True)
class PendingTickle:
    """A task server with untickled pending work, and when the newest of it was created."""

    task_server: str
    newest_created_at: float


@dataclass(slots=True)
class EventOutcome:
    """What recording a batch of status events did."""

    accepted: list[str]
    recorded: list[m.StatusEvent]  # newly recorded now
    run_now_to_recorded: list[float]  # latencies of executions finished now
    finished: list[str]  # their final statuses


def token_sha256(token: str) -> str:
    """The stored form of a bearer token."""
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    """The NS database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _create_engine(url)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        # SQLite: writers take the write lock at BEGIN, so a read-then-write transaction never
        # fails half-way with "database is locked" (busy_timeout makes them queue instead)
        self._write = sessionmaker(
            self.engine.execution_options(tickle_write=True), expire_on_commit=False
        )

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
        self.engine.dispose()

    @contextmanager
    def reading(self) -> Iterator[Session]:
        with self._read() as session, session.begin():
            yield session

    @contextmanager
    def writing(self) -> Iterator[Session]:
        with self._write() as session, session.begin():
            yield session

    # --- credentials ---------------------------------------------------------------------------

    def caller_for(self, sha: str) -> Caller | None:
        """The task server (or agent) whose token hashes to `sha`."""
        with self.reading() as s:
            row = s.execute(
                select(TaskServer.id, TaskServer.name).where(TaskServer.token_sha256 == sha)
            ).first()
            if row is not None:
                return Caller("task_server", row.name, row.id)
            crow = s.execute(
                select(Computer.id, Computer.name).where(Computer.token_sha256 == sha)
            ).first()
            if crow is not None:
                return Caller("computer", crow.name, crow.id)
        return None

    # --- task servers and computers ------------------------------------------------------------

    def register_task_server(
        self, reg: m.TaskServerRegister, ns_id: str
    ) -> m.TaskServerCredentials:
        """Create the task server, or rotate its credentials if the name exists."""
        return _retry_on_conflict(lambda: self._register_task_server(reg, ns_id))

    def _register_task_server(
        self, reg: m.TaskServerRegister, ns_id: str
    ) -> m.TaskServerCredentials:
        token, key = secrets.token_urlsafe(32), _new_key()
        with self.writing() as s:
            ts = s.scalar(select(TaskServer).where(TaskServer.name == reg.name))
            if ts is None:
                ts = TaskServer(name=reg.name, registered_at=time.time(), tickle_state="unknown")
                s.add(ts)
            ts.token_sha256 = token_sha256(token)
            ts.tickle_key = key
            ts.tickle_host = reg.tickle_host
            ts.tickle_port = reg.tickle_port
            ts.api_url = reg.api_url
        return m.TaskServerCredentials(name=reg.name, token=token, tickle_key=key, ns_id=ns_id)

    def register_agent(self, ts: Caller, reg: m.AgentRegistration) -> m.AgentCredentials:
        """Create the computer, or move it to this task server and rotate its credentials."""
        return _retry_on_conflict(lambda: self._register_agent(ts, reg))

    def _register_agent(self, ts: Caller, reg: m.AgentRegistration) -> m.AgentCredentials:
        token, key = secrets.token_urlsafe(32), _new_key()
        with self.writing() as s:
            c = s.scalar(select(Computer).where(Computer.name == reg.name))
            if c is None:
                c = Computer(name=reg.name)
                s.add(c)
            c.task_server_id = ts.id
            c.token_sha256 = token_sha256(token)
            c.tickle_key = key
            c.tickle_host = reg.tickle_host
            c.tickle_port = reg.tickle_port
            c.cem = reg.cem
            c.groups = list(reg.groups)
            c.reported_address = reg.reported_address
            c.observed_address = reg.observed_address
            c.nat_detected = _nat(reg.reported_address, reg.observed_address)
            c.tickle_state = "cem" if reg.cem else "unknown"
            c.last_contact_at = time.time()
        return m.AgentCredentials(name=reg.name, token=token, tickle_key=key)

    def clients(self, ts: Caller) -> list[m.ClientInfo]:
        with self.reading() as s:
            rows = s.scalars(
                select(Computer).where(Computer.task_server_id == ts.id).order_by(Computer.name)
            ).all()
            return [
                m.ClientInfo(
                    name=c.name,
                    token_sha256=c.token_sha256,
                    tickle_key=c.tickle_key,
                    tickle_host=c.tickle_host,
                    tickle_port=c.tickle_port,
                    cem=c.cem,
                )
                for c in rows
            ]

    def task_servers(self) -> list[m.TaskServerOut]:
        with self.reading() as s:
            rows = s.execute(
                select(Computer.task_server_id, func.count()).group_by(Computer.task_server_id)
            )
            counts: dict[int | None, int] = {row[0]: row[1] for row in rows}
            return [
                m.TaskServerOut(
                    name=t.name,
                    tickle_host=t.tickle_host,
                    tickle_port=t.tickle_port,
                    api_url=t.api_url,
                    tickle_state=_state(t.tickle_state),
                    last_pull_at=t.last_pull_at,
                    clients=counts.get(t.id, 0),
                )
                for t in s.scalars(select(TaskServer).order_by(TaskServer.name))
            ]

    def computers(self) -> list[m.ComputerOut]:
        with self.reading() as s:
            return [_computer_out(c) for c in s.scalars(select(Computer).order_by(Computer.name))]

    def update_computer_states(self, ts: Caller, states: Sequence[m.ComputerState]) -> None:
        """Apply what a task server saw of its clients (tickle reachability, observed address)."""
        names = {st.name for st in states}
        with self.writing() as s:
            found = {c.name: c for c in s.scalars(select(Computer).where(Computer.name.in_(names)))}
            for st in states:
                c = found.get(st.name)
                if c is None:
                    raise NotFound(f"computer {st.name!r} is not registered")
                if c.task_server_id != ts.id:
                    raise Forbidden(f"computer {st.name!r} is not a client of {ts.name!r}")
            for st in sorted(states, key=lambda st: st.at):
                c = found[st.name]
                if st.tickle_state is not None and not (c.cem and st.tickle_state != "cem"):
                    c.tickle_state = st.tickle_state
                if st.observed_address is not None:
                    c.observed_address = st.observed_address
                    c.nat_detected = _nat(c.reported_address, st.observed_address)
                c.last_contact_at = max(c.last_contact_at or 0.0, st.at)

    def set_task_server_state(self, name: str, state: str) -> None:
        with self.writing() as s:
            s.execute(update(TaskServer).where(TaskServer.name == name).values(tickle_state=state))

    # --- tasks and jobs ------------------------------------------------------------------------

    def create_task(self, body: m.TaskCreate) -> m.TaskOut:
        try:
            with self.writing() as s:
                if s.scalar(select(Task.id).where(Task.name == body.name)) is not None:
                    raise Conflict(f"task {body.name!r} exists")
                t = Task(
                    name=body.name,
                    command=body.command,
                    script=body.script,
                    timeout_s=body.timeout_s,
                )
                s.add(t)
                s.flush()
                return _task_out(t)
        except IntegrityError:
            raise Conflict(f"task {body.name!r} exists") from None

    def tasks(self) -> list[m.TaskOut]:
        with self.reading() as s:
            return [_task_out(t) for t in s.scalars(select(Task).order_by(Task.id))]

    def create_job(self, body: m.JobCreate) -> m.JobOut:
        try:
            with self.writing() as s:
                if s.scalar(select(Job.id).where(Job.name == body.name)) is not None:
                    raise Conflict(f"job {body.name!r} exists")
                known = set(s.scalars(select(Task.id).where(Task.id.in_(body.task_ids))))
                missing = [i for i in body.task_ids if i not in known]
                if missing:
                    raise NotFound(f"unknown task id(s): {', '.join(map(str, missing))}")
                job = Job(
                    name=body.name,
                    tasks=[JobTask(position=i, task_id=t) for i, t in enumerate(body.task_ids)],
                )
                s.add(job)
                s.flush()
                return m.JobOut(id=job.id, name=job.name, task_ids=list(body.task_ids))
        except IntegrityError:
            raise Conflict(f"job {body.name!r} exists") from None

    def jobs(self) -> list[m.JobOut]:
        with self.reading() as s:
            return [
                m.JobOut(id=j.id, name=j.name, task_ids=[jt.task_id for jt in j.tasks])
                for j in s.scalars(select(Job).order_by(Job.id))
            ]

    # --- runs and executions -------------------------------------------------------------------

    def create_run(self, body: m.RunCreate) -> m.RunOut:
        """Run now: one pending execution per selected computer (named or in a named group)."""
        now = time.time()
        with self.writing() as s:
            kind, steps = self._steps(s, body)
            targets = self._targets(s, body)
            run = Run(task_id=body.task_id, job_id=body.job_id, created_at=now)
            s.add(run)
            s.flush()
            for c in targets:
                s.add(
                    Execution(
                        run_id=run.id,
                        computer_id=c.id,
                        task_id=body.task_id,
                        job_id=body.job_id,
                        kind=kind,
                        steps=steps,
                        status="pending",
                        step_results=[],
                        created_at=now,
                    )
                )
            s.flush()
            s.expire(run, ["executions"])
            return _run_out(run)

    def run(self, run_id: int) -> m.RunOut:
        with self.reading() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise NotFound(f"run {run_id} does not exist")
            return _run_out(run)

    def execution(self, execution_id: int) -> m.ExecutionOut:
        with self.reading() as s:
            ex = s.get(Execution, execution_id)
            if ex is None:
                raise NotFound(f"execution {execution_id} does not exist")
            return _execution_out(ex)

    def _steps(self, s: Session, body: m.RunCreate) -> tuple[str, list[dict[str, Any]]]:
        if body.task_id is not None:
            task = s.get(Task, body.task_id)
            if task is None:
                raise NotFound(f"task {body.task_id} does not exist")
            return "task", [_spec(task)]
        job = s.get(Job, body.job_id)
        if job is None:
            raise NotFound(f"job {body.job_id} does not exist")
        by_id = {
            t.id: t
            for t in s.scalars(select(Task).where(Task.id.in_(jt.task_id for jt in job.tasks)))
        }
        return "job", [_spec(by_id[jt.task_id]) for jt in job.tasks]

    def _targets(self, s: Session, body: m.RunCreate) -> list[Computer]:
        chosen: dict[str, Computer] = {}
        if body.computers:
            names = list(dict.fromkeys(body.computers))
            found = {c.name: c for c in s.scalars(select(Computer).where(Computer.name.in_(names)))}
            missing = [n for n in names if n not in found]
            if missing:
                raise NotFound(f"unknown computer(s): {', '.join(missing)}")
            chosen.update((n, found[n]) for n in names)
        if body.groups:
            wanted = set(body.groups)
            matched: set[str] = set()
            # groups are a JSON list per computer: filtered here, portable across databases
            for c in s.scalars(select(Computer).order_by(Computer.name)):
                hit = wanted.intersection(c.groups or [])
                if hit:
                    matched |= hit
                    chosen.setdefault(c.name, c)
            empty = [g for g in body.groups if g not in matched]
            if empty:
                raise NotFound(f"no computer in group(s): {', '.join(empty)}")
        return list(chosen.values())

    # --- the task server's pull and its events -------------------------------------------------

    def pull_work(self, ts: Caller, now: float, via: m.TsPullVia) -> m.WorkOut:
        """Every unfinished execution of this task server's clients; stamps the first pull and
        remembers that this task server was given each of them (see `record_events`).

        Every pull stamps `last_pull_at`; only one a tickle caused stamps `tickle_pulled_at`
        (the acknowledgement another NS process sees)."""
        # a concurrent pull of the same task server (another NS process) may note a pair first
        return _retry_on_conflict(lambda: self._pull_work(ts, now, via))

    def _pull_work(self, ts: Caller, now: float, via: m.TsPullVia) -> m.WorkOut:
        stamps = {"last_pull_at": now} | ({"tickle_pulled_at": now} if via == "tickle" else {})
        with self.writing() as s:
            s.execute(update(TaskServer).where(TaskServer.id == ts.id).values(**stamps))
            rows = s.scalars(
                select(Execution)
                .join(Computer, Execution.computer_id == Computer.id)
                .where(Computer.task_server_id == ts.id, Execution.status.not_in(_FINAL))
                .order_by(Execution.id)
            ).all()
            for ex in rows:
                if ex.ts_pulled_at is None:
                    ex.ts_pulled_at = now
            ids = [ex.id for ex in rows]
            known = set(
                s.scalars(
                    select(ExecutionPull.execution_id).where(
                        ExecutionPull.task_server_id == ts.id, ExecutionPull.execution_id.in_(ids)
                    )
                )
            )
            s.add_all(
                ExecutionPull(execution_id=i, task_server_id=ts.id, pulled_at=now)
                for i in ids
                if i not in known
            )
            return m.WorkOut(
                executions=[
                    m.ExecutionWork(
                        execution_id=ex.id,
                        computer=ex.computer.name,
                        kind="job" if ex.kind == "job" else "task",
                        steps=[m.TaskSpec.model_validate(step) for step in ex.steps],
                    )
                    for ex in rows
                ]
            )

    def record_events(
        self, ts: Caller, events: Sequence[m.StatusEvent], now: float
    ) -> EventOutcome:
        """Record each event exactly once (by event id) and apply it to its execution.

        A task server may report an execution of its client now, or one a pull gave it before
        the computer moved away (it may hold that execution's events from before the move); the
        event must name the execution's computer. Other events are left out of `accepted`.
        """
        # another process may record one of these ids between our check and our commit
        return _retry_on_conflict(lambda: self._record(ts, events, now))

    def _record(self, ts: Caller, events: Sequence[m.StatusEvent], now: float) -> EventOutcome:
        out = EventOutcome(accepted=[], recorded=[], run_now_to_recorded=[], finished=[])
        with self.writing() as s:
            exec_ids = {e.execution_id for e in events}
            # PostgreSQL: lock the executions first (in id order: no deadlock), so another NS
            # process recording events of the same executions waits for this commit instead of
            # overwriting it with what it read before (a `started` reopening a finished one);
            # the event ids are read after the lock, so a batch recorded meanwhile is seen
            execs = {
                ex.id: ex
                for ex in s.scalars(
                    select(Execution)
                    .where(Execution.id.in_(exec_ids))
                    .order_by(Execution.id)
                    .with_for_update(of=Execution)
                )
            }
            ids = [e.event_id for e in events]
            seen = set(
                s.scalars(select(StatusEventRow.event_id).where(StatusEventRow.event_id.in_(ids)))
            )
            pulled = set(
                s.scalars(
                    select(ExecutionPull.execution_id).where(
                        ExecutionPull.task_server_id == ts.id,
                        ExecutionPull.execution_id.in_(exec_ids),
                    )
                )
            )
            for e in events:
                if e.event_id in seen:
                    out.accepted.append(e.event_id)
                    continue
                ex = execs.get(e.execution_id)
                if ex is None:
                    log.warning(
                        "status event %s from %s for unknown execution %d: ignored",
                        e.event_id, ts.name, e.execution_id,
                    )  # fmt: skip
                    out.accepted.append(e.event_id)
                    continue
                given = ex.computer.task_server_id == ts.id or ex.id in pulled
                if not given or ex.computer.name != e.computer:
                    log.warning(
                        "status event %s from %s refused: execution %d is for %s (event says %s),"
                        " neither a client of this task server nor pulled by it",
                        e.event_id, ts.name, ex.id, ex.computer.name, e.computer,
                    )  # fmt: skip
                    continue
                s.add(
                    StatusEventRow(
                        event_id=e.event_id,
                        execution_id=ex.id,
                        kind=e.kind,
                        at=e.at,
                        body=e.model_dump(mode="json"),
                        recorded_at=now,
                    )
                )
                seen.add(e.event_id)
                before = _progress(ex)
                after = lifecycle.apply(before, e, now, [step["name"] for step in ex.steps])
                _set_progress(ex, after)
                if lifecycle.finished_now(before, after):
                    out.run_now_to_recorded.append(max(0.0, now - ex.created_at))
                    out.finished.append(ex.status)
                out.accepted.append(e.event_id)
                out.recorded.append(e)
        return out

    # --- settings ------------------------------------------------------------------------------

    def settings(self) -> m.SettingsOut:
        with self.reading() as s:
            return _settings_out(_settings_row(s))

    def pull_settings(self, ts: Caller, now: float, via: m.TsPullVia) -> m.SettingsOut:
        """The task server's settings pull; one a tickle caused is stamped, so another process
        can see the acknowledgement."""
        if via != "tickle":
            return self.settings()
        with self.writing() as s:
            s.execute(
                update(TaskServer).where(TaskServer.id == ts.id).values(settings_pulled_at=now)
            )
            return _settings_out(_settings_row(s))

    def update_settings(self, body: m.SettingsUpdate) -> m.SettingsOut:
        """Change the central settings and bump their version."""
        with self.writing() as s:
            # locked: on PostgreSQL another NS process's change waits, then bumps again
            row = _settings_row(s, lock=True)
            for field, value in body.model_dump(exclude_none=True).items():
                setattr(row, field, value)
            row.version += 1
            return _settings_out(row)

    # --- the tickle server's view --------------------------------------------------------------

    def task_server_links(self) -> list[TaskServerLink]:
        with self.reading() as s:
            return [
                TaskServerLink(
                    name=t.name,
                    addr=(t.tickle_host, t.tickle_port),
                    key=base64.b64decode(t.tickle_key),
                    tickle_pulled_at=t.tickle_pulled_at,
                    settings_pulled_at=t.settings_pulled_at,
                )
                for t in s.scalars(select(TaskServer))
            ]

    def pending_tickles(self, tickled_too: bool = False) -> list[PendingTickle]:
        """Task servers with pending executions that were neither tickled for nor pulled yet
        (`tickled_too`: not pulled yet, tickled or not)."""
        unpulled = [Execution.status == "pending", Execution.ts_pulled_at.is_(None)]
        if not tickled_too:
            unpulled.append(Execution.tickle_sent_at.is_(None))
        with self.reading() as s:
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
        with self.writing() as s:
            clients = (
                select(Computer.id)
                .join(TaskServer, Computer.task_server_id == TaskServer.id)
                .where(TaskServer.name == task_server)
            )
            result = s.execute(
                update(Execution)
                .where(
                    Execution.computer_id.in_(clients.scalar_subquery()),
                    Execution.tickle_sent_at.is_(None),
                    Execution.created_at <= sent_at,
                    or_(Execution.ts_pulled_at.is_(None), Execution.ts_pulled_at >= sent_at),
                )
                .values(tickle_sent_at=sent_at)
                .execution_options(synchronize_session=False)
            )
            return int(getattr(result, "rowcount", 0) or 0)

    def dispatcher_lock(self) -> DispatcherLock:
        return DispatcherLock(self.engine)


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
                # close() alone would hand the session, lock held, back to the pool: another
                # process could not dispatch until this one's engine is disposed
                self._conn.invalidate()
                self._conn.close()
            except Exception:
                log.debug("closing the dispatcher lock connection failed", exc_info=True)
            self._conn = None


# --- helpers ----------------------------------------------------------------------------------


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


def _new_key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def _nat(reported: str | None, observed: str | None) -> bool:
    return bool(reported and observed and reported != observed)


def _state(value: str) -> m.TickleState:
    if value in ("reachable", "unreachable", "cem"):
        return value  # type: ignore[return-value]
    return "unknown"


def _spec(task: Task) -> dict[str, Any]:
    return m.TaskSpec(
        name=task.name, command=task.command, script=task.script, timeout_s=task.timeout_s
    ).model_dump(mode="json")


def _task_out(t: Task) -> m.TaskOut:
    return m.TaskOut(
        id=t.id, name=t.name, command=t.command, script=t.script, timeout_s=t.timeout_s
    )


def _computer_out(c: Computer) -> m.ComputerOut:
    return m.ComputerOut(
        name=c.name,
        task_server=c.task_server.name if c.task_server is not None else None,
        tickle_state=_state(c.tickle_state),
        cem=c.cem,
        groups=list(c.groups or []),
        reported_address=c.reported_address,
        observed_address=c.observed_address,
        nat_detected=c.nat_detected,
        last_contact_at=c.last_contact_at,
    )


def _run_out(run: Run) -> m.RunOut:
    return m.RunOut(
        id=run.id,
        created_at=run.created_at,
        task_id=run.task_id,
        job_id=run.job_id,
        executions=[_execution_out(ex) for ex in run.executions],
    )


def _execution_out(ex: Execution) -> m.ExecutionOut:
    ts = ex.computer.task_server
    return m.ExecutionOut.model_validate(
        {
            "id": ex.id,
            "run_id": ex.run_id,
            "computer": ex.computer.name,
            "task_server": ts.name if ts is not None else None,
            "status": ex.status,
            "via": ex.via,
            "exit_code": ex.exit_code,
            "output_tail": ex.output_tail,
            "steps": ex.step_results or [],
            "timeline": [
                {"step": step, "at": getattr(ex, _TIMELINE_COLUMNS[step])}
                for step in m.TIMELINE_STEPS
            ],
        }
    )


def _settings_row(s: Session, lock: bool = False) -> Settings:
    row = s.get(Settings, 1, with_for_update=lock)
    if row is None:  # the migration inserts it; a hand-made database may lack it
        row = Settings(
            id=1, version=1, task_request_interval_s=1800, poll_jitter_fraction=0.1,
            ts_check_interval_s=60,
        )  # fmt: skip
        s.add(row)
        s.flush()
    return row


def _settings_out(row: Settings) -> m.SettingsOut:
    return m.SettingsOut(
        version=row.version,
        task_request_interval_s=row.task_request_interval_s,
        poll_jitter_fraction=row.poll_jitter_fraction,
        ts_check_interval_s=row.ts_check_interval_s,
    )


def _progress(ex: Execution) -> lifecycle.Progress:
    values: dict[str, Any] = {name: getattr(ex, name) for name in _PROGRESS_FIELDS}
    values["step_results"] = tuple(ex.step_results or ())
    return lifecycle.Progress(**values)


def _set_progress(ex: Execution, progress: lifecycle.Progress) -> None:
    for name in _PROGRESS_FIELDS:
        setattr(ex, name, getattr(progress, name))
    ex.step_results = list(progress.step_results)


def _retry_on_conflict(write: Callable[[], _T], tries: int = 3) -> _T:
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
