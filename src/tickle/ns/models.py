"""The notification server's tables (SQLAlchemy 2, typed): inventory, tasks, runs, executions."""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class TaskServer(Base):
    """A registered task server: credentials, where to tickle it, whether tickles get through."""

    __tablename__ = "task_servers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), index=True)
    tickle_key: Mapped[str] = mapped_column(String(64))  # base64 of 32 bytes
    tickle_host: Mapped[str] = mapped_column(String(255))
    tickle_port: Mapped[int] = mapped_column(Integer)
    api_url: Mapped[str] = mapped_column(String(2048))
    tickle_state: Mapped[str] = mapped_column(String(16), default="unknown")
    registered_at: Mapped[float] = mapped_column(Double)
    last_pull_at: Mapped[float | None] = mapped_column(Double, default=None)  # any work pull
    # the work pull a tickle caused: the acknowledgement of tasks tickles for another process
    tickle_pulled_at: Mapped[float | None] = mapped_column(Double, default=None)
    # the settings pull a tickle caused: the acknowledgement of settings tickles, likewise
    settings_pulled_at: Mapped[float | None] = mapped_column(Double, default=None)
    # SHA-256 of its identity: a registration under its name must bring it (NULL: the next one's)
    identity_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    # how far its clock is ahead of the NS's, measured from its requests (None: unmeasured)
    clock_offset_s: Mapped[float | None] = mapped_column(Double, default=None)


class Computer(Base):
    """A computer whose client task agent is registered with a task server."""

    __tablename__ = "computers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    task_server_id: Mapped[int | None] = mapped_column(
        ForeignKey("task_servers.id", ondelete="SET NULL"), index=True, default=None
    )
    token_sha256: Mapped[str] = mapped_column(String(64), index=True)
    tickle_key: Mapped[str] = mapped_column(String(64))
    tickle_host: Mapped[str | None] = mapped_column(String(255), default=None)
    tickle_port: Mapped[int] = mapped_column(Integer, default=50124)
    cem: Mapped[bool] = mapped_column(Boolean, default=False)
    groups: Mapped[list[str]] = mapped_column(JSON, default=list)
    reported_address: Mapped[str | None] = mapped_column(String(255), default=None)
    observed_address: Mapped[str | None] = mapped_column(String(255), default=None)
    nat_detected: Mapped[bool] = mapped_column(Boolean, default=False)
    tickle_state: Mapped[str] = mapped_column(String(16), default="unknown")
    last_contact_at: Mapped[float | None] = mapped_column(Double, default=None)
    # SHA-256 of its agent's identity: a registration under its name must bring it (NULL: the
    # next registration's is kept, after `rekey` or for agents registered before identities)
    identity_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    # how far its clock is ahead of its task server's, as the task server measured it
    clock_offset_s: Mapped[float | None] = mapped_column(Double, default=None)
    # the settings version its agent has (its contacts say so, through its task server)
    settings_version: Mapped[int | None] = mapped_column(Integer, default=None)
    # forgotten by the operator: no credentials, not listed, not a target; its history stays,
    # and its agent's next registration makes it a new computer
    forgotten_at: Mapped[float | None] = mapped_column(Double, default=None)

    task_server: Mapped[TaskServer | None] = relationship(lazy="joined")


class Registration(Base):
    """A registration under a new name that waits for an operator (registration_approval =
    manual), was approved and not yet repeated, or was rejected. One per kind and name."""

    __tablename__ = "registrations"
    __table_args__ = (UniqueConstraint("kind", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # computer | task_server
    name: Mapped[str] = mapped_column(String(64))
    identity_sha256: Mapped[str | None] = mapped_column(String(64), default=None)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    task_server: Mapped[str | None] = mapped_column(String(64), default=None)
    address: Mapped[str | None] = mapped_column(String(255), default=None)
    requested_at: Mapped[float] = mapped_column(Double)
    last_seen_at: Mapped[float] = mapped_column(Double)
    decided_at: Mapped[float | None] = mapped_column(Double, default=None)


class Task(Base):
    """A task: a command (argv) or a script, with a timeout."""

    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    command: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    script: Mapped[str | None] = mapped_column(Text, default=None)
    timeout_s: Mapped[float] = mapped_column(Double, default=300.0)


class Job(Base):
    """A job: an ordered list of tasks."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    tasks: Mapped[list[JobTask]] = relationship(
        order_by="JobTask.position", cascade="all, delete-orphan", lazy="selectin"
    )


class JobTask(Base):
    """One step of a job."""

    __tablename__ = "job_tasks"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"))


class Run(Base):
    """One "run now" of a task or a job on a set of computers."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"), default=None)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), default=None)
    # what ran, named when the run was made: the task or job may be deleted later; an ad-hoc
    # command (no task_id, no job_id) carries its task inline and is named by it
    label: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[float] = mapped_column(Double, index=True)
    # executions not started by then end `expired` (None: never)
    expires_at: Mapped[float | None] = mapped_column(Double, index=True, default=None)
    executions: Mapped[list[Execution]] = relationship(
        order_by="Execution.id", lazy="selectin", back_populates="run"
    )


class Execution(Base):
    """One run of a task or job on one computer, with a timestamp for every step it went through."""

    __tablename__ = "executions"
    __table_args__ = (
        Index("ix_executions_status_tickle", "status", "tickle_sent_at"),
        # a computer's unfinished executions (a work pull), not its whole history
        Index("ix_executions_computer_status", "computer_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), index=True)
    computer_id: Mapped[int] = mapped_column(ForeignKey("computers.id"), index=True)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"), default=None)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), default=None)
    kind: Mapped[str] = mapped_column(String(8))  # task | job
    steps: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # TaskSpec snapshots
    status: Mapped[str] = mapped_column(String(16), default="pending")
    via: Mapped[str | None] = mapped_column(String(16), default=None)
    exit_code: Mapped[int | None] = mapped_column(Integer, default=None)
    output_tail: Mapped[str | None] = mapped_column(Text, default=None)
    step_results: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    created_at: Mapped[float] = mapped_column(Double)
    tickle_sent_at: Mapped[float | None] = mapped_column(Double, default=None)
    ts_pulled_at: Mapped[float | None] = mapped_column(Double, default=None)
    agent_tickled_at: Mapped[float | None] = mapped_column(Double, default=None)
    agent_pulled_at: Mapped[float | None] = mapped_column(Double, default=None)
    started_at: Mapped[float | None] = mapped_column(Double, default=None)
    finished_at: Mapped[float | None] = mapped_column(Double, default=None)
    cached_at_ts: Mapped[float | None] = mapped_column(Double, default=None)
    recorded_at: Mapped[float | None] = mapped_column(Double, default=None)
    # an operator cancelled it after its agent pulled it: the agent stops it and reports how
    cancel_requested_at: Mapped[float | None] = mapped_column(Double, index=True, default=None)
    # its run's expiry: not started by then, it ends `expired` (the agent checks it too)
    expires_at: Mapped[float | None] = mapped_column(Double, index=True, default=None)

    run: Mapped[Run] = relationship(back_populates="executions")
    computer: Mapped[Computer] = relationship(lazy="joined")


class ExecutionOutput(Base):
    """One step's output as its agent kept it (stdout and stderr, cut at the agent's cap)."""

    __tablename__ = "execution_outputs"

    execution_id: Mapped[int] = mapped_column(
        ForeignKey("executions.id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    stdout: Mapped[str] = mapped_column(Text)
    stderr: Mapped[str] = mapped_column(Text)


class ExecutionPull(Base):
    """A task server that a work pull gave an execution to (one row per pair).

    It may report that execution's events even after the computer moved to another task server:
    events it cached before the move are recorded when it forwards them.
    """

    __tablename__ = "execution_pulls"

    execution_id: Mapped[int] = mapped_column(
        ForeignKey("executions.id", ondelete="CASCADE"), primary_key=True
    )
    task_server_id: Mapped[int] = mapped_column(
        ForeignKey("task_servers.id", ondelete="CASCADE"), primary_key=True
    )
    pulled_at: Mapped[float] = mapped_column(Double)


class StatusEvent(Base):
    """A status event recorded exactly once (unique event id)."""

    __tablename__ = "status_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    execution_id: Mapped[int] = mapped_column(ForeignKey("executions.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    at: Mapped[float] = mapped_column(Double)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    recorded_at: Mapped[float] = mapped_column(Double)


class Settings(Base):
    """The central settings handed down to task servers and agents (a single row, id 1)."""

    __tablename__ = "settings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    task_request_interval_s: Mapped[int] = mapped_column(Integer, default=1800)
    poll_jitter_fraction: Mapped[float] = mapped_column(Double, default=0.1)
    ts_check_interval_s: Mapped[int] = mapped_column(Integer, default=60)
    long_poll: Mapped[bool] = mapped_column(Boolean, default=False)
    long_poll_timeout_s: Mapped[int] = mapped_column(Integer, default=55)


class Operator(Base):
    """A named operator account: its own token (kept as SHA-256), so the audit says who."""

    __tablename__ = "operators"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[float] = mapped_column(Double)


class ConsoleSession(Base):
    """A web console session: the SHA-256 of its cookie, who logged in, and when it expires."""

    __tablename__ = "console_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    who: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float] = mapped_column(Double, index=True)


class AuditEvent(Base):
    """One operator action: who (an operator's name, or "admin"), when, what, on what."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Double, index=True)
    who: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(255))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
