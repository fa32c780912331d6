"""Every JSON body that crosses HTTP between the components (and the operator's API).

Both sides of each exchange import these models, so a field changes in one place. Bad input gets a
validation error that names the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Port = Annotated[int, Field(ge=1, le=65535)]
# integers the NS stores in INTEGER columns (32-bit on PostgreSQL; larger ones crash SQLite too)
DB_INT_MIN, DB_INT_MAX = -(2**31), 2**31 - 1
DbInt = Annotated[int, Field(ge=DB_INT_MIN, le=DB_INT_MAX)]
# How often agents poll their task server when no tickle reaches them. Below 10 s a fleet's polls
# would swamp its task servers (10,000 agents: 1,000 requests/s); a day is the longest.
TASK_REQUEST_INTERVAL_MIN_S, TASK_REQUEST_INTERVAL_MAX_S = 10, 86400
TaskRequestIntervalS = Annotated[
    int, Field(ge=TASK_REQUEST_INTERVAL_MIN_S, le=TASK_REQUEST_INTERVAL_MAX_S)
]
TickleState = Literal["unknown", "reachable", "unreachable", "cem"]
ExecutionStatus = Literal[
    "pending", "delivered", "running", "succeeded", "failed", "timed_out", "interrupted"
]
FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "timed_out", "interrupted"})
EventKind = Literal["agent_tickled", "agent_pulled", "started", "step_finished", "finished"]
PullVia = Literal["tickle", "poll", "check_now"]
PolicyVia = Literal["tickle", "refresh"]
# why a task server pulls from the NS: a tickle, its periodic check, or its start
TsPullVia = Literal["tickle", "check", "start"]
OUTPUT_TAIL_MAX = 4096
# the nine steps of an execution's timeline (`ExecutionOut.timeline`), in the order it goes through
TIMELINE_STEPS = (
    "created",
    "tickle_sent",
    "ts_pulled",
    "agent_tickled",
    "agent_pulled",
    "started",
    "finished",
    "cached_at_ts",
    "recorded",
)


class Model(BaseModel):
    """Strict base: unknown fields are an error, so typos are named, not ignored."""

    model_config = ConfigDict(extra="forbid")


# --- tasks, jobs, runs (operator API) -------------------------------------------------------


class TaskSpec(Model):
    """What an agent runs: a command (argv) or a shell script, with a timeout."""

    name: Name
    command: list[str] | None = Field(default=None, min_length=1, max_length=256)
    script: str | None = Field(default=None, min_length=1, max_length=65536)
    timeout_s: float = Field(default=300.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _one_of_command_or_script(self) -> TaskSpec:
        if (self.command is None) == (self.script is None):
            raise ValueError("give exactly one of 'command' or 'script'")
        return self


class TaskCreate(TaskSpec):
    pass


class TaskOut(TaskSpec):
    id: int


class JobCreate(Model):
    name: Name
    task_ids: list[DbInt] = Field(min_length=1, max_length=50)


class JobOut(JobCreate):
    id: int


class RunCreate(Model):
    """Run a task or a job now on named computers and/or groups."""

    task_id: DbInt | None = None
    job_id: DbInt | None = None
    computers: list[Name] = Field(default_factory=list, max_length=100_000)
    groups: list[Name] = Field(default_factory=list, max_length=1000)

    @model_validator(mode="after")
    def _one_target(self) -> RunCreate:
        if (self.task_id is None) == (self.job_id is None):
            raise ValueError("give exactly one of 'task_id' or 'job_id'")
        if not self.computers and not self.groups:
            raise ValueError("give at least one computer or group")
        return self


class TimelineStep(Model):
    step: str
    at: float | None


class StepResult(Model):
    step: int
    name: str
    exit_code: int | None
    status: str


class ExecutionOut(Model):
    id: int
    run_id: int
    computer: str
    task_server: str | None
    status: ExecutionStatus
    via: PullVia | None = None
    exit_code: int | None = None
    output_tail: str | None = None
    steps: list[StepResult] = Field(default_factory=list)
    timeline: list[TimelineStep] = Field(default_factory=list)


class RunOut(Model):
    id: int
    created_at: float
    task_id: int | None
    job_id: int | None
    executions: list[ExecutionOut]


# --- inventory views --------------------------------------------------------------------------


class TaskServerOut(Model):
    name: str
    tickle_host: str
    tickle_port: int
    api_url: str
    tickle_state: TickleState
    last_pull_at: float | None
    clients: int


class ComputerOut(Model):
    name: str
    task_server: str | None
    tickle_state: TickleState
    cem: bool
    groups: list[str]
    reported_address: str | None
    observed_address: str | None
    nat_detected: bool
    last_contact_at: float | None


class SettingsOut(Model):
    version: int
    task_request_interval_s: int
    poll_jitter_fraction: float
    ts_check_interval_s: int


class SettingsUpdate(Model):
    """A change of the central settings; a field left out (or null) keeps its value."""

    task_request_interval_s: TaskRequestIntervalS | None = Field(
        default=None, description="Task Request Interval: how often agents poll (s)"
    )
    poll_jitter_fraction: float | None = Field(default=None, ge=0.0, le=0.5)
    ts_check_interval_s: int | None = Field(default=None, ge=5, le=86400)


# --- task server <-> notification server ------------------------------------------------------


class TaskServerRegister(Model):
    enrollment_secret: str = Field(min_length=1, max_length=512)
    name: Name
    tickle_host: str = Field(min_length=1, max_length=255)
    tickle_port: Port = 50123
    api_url: str = Field(min_length=1, max_length=2048)


class TaskServerCredentials(Model):
    name: str
    token: str
    tickle_key: str  # base64
    ns_id: str


class AgentRegistration(Model):
    """What a task server tells the NS about an agent that registered with it."""

    name: Name
    tickle_host: str | None = Field(default=None, max_length=255)
    tickle_port: Port = 50124
    cem: bool = False
    reported_address: str | None = Field(default=None, max_length=255)
    observed_address: str | None = Field(default=None, max_length=255)
    groups: list[Name] = Field(default_factory=list, max_length=64)


class AgentCredentials(Model):
    name: str
    token: str
    tickle_key: str  # base64


class ClientInfo(Model):
    name: str
    token_sha256: str
    tickle_key: str  # base64
    tickle_host: str | None
    tickle_port: int
    cem: bool


class ExecutionWork(Model):
    """The job information for one execution: everything the agent needs to run it."""

    execution_id: int
    computer: str
    kind: Literal["task", "job"]
    steps: list[TaskSpec] = Field(min_length=1)


class WorkOut(Model):
    executions: list[ExecutionWork]


class StatusEvent(Model):
    event_id: str = Field(min_length=8, max_length=64)
    execution_id: DbInt
    computer: Name
    kind: EventKind
    at: float
    cached_at: float | None = None
    step: int | None = Field(default=None, ge=0, le=DB_INT_MAX)
    exit_code: DbInt | None = None
    status: ExecutionStatus | None = None
    output_tail: str | None = Field(default=None, max_length=OUTPUT_TAIL_MAX)
    via: PullVia | None = None


class EventBatch(Model):
    events: list[StatusEvent] = Field(max_length=1000)


class EventAck(Model):
    accepted: list[str]


class ComputerState(Model):
    name: Name
    tickle_state: TickleState | None = None
    observed_address: str | None = None
    at: float


# --- agent <-> task server --------------------------------------------------------------------


class AgentPolicy(Model):
    """The agent's configuration policy. It never carries tasks."""

    settings_version: int
    task_request_interval_s: int
    poll_jitter_fraction: float
    cem: bool


class AgentRegister(Model):
    enrollment_secret: str = Field(min_length=1, max_length=512)
    name: Name
    tickle_host: str | None = Field(default=None, max_length=255)
    tickle_port: Port = 50124
    cem: bool = False
    reported_address: str | None = Field(default=None, max_length=255)
    groups: list[Name] = Field(default_factory=list, max_length=64)


class AgentEnrollment(Model):
    name: str
    token: str
    tickle_key: str  # base64
    ts_name: str
    policy: AgentPolicy


class AgentTasks(Model):
    executions: list[ExecutionWork]
    policy: AgentPolicy


class Health(Model):
    status: Literal["ok"] = "ok"
    component: str


class About(Model):
    """What a running notification server is: its version, its database and its dispatcher role.

    `database_location` is the SQLite file path or `host:port/dbname`, never a user or password.
    """

    component: Literal["ns"] = "ns"
    version: str
    database: Literal["sqlite", "postgresql"]
    database_location: str
    schema_revision: str | None
    dispatcher_active: bool
    started_at: float


# --- operators, the audit and the run list (the web console's API) ---------------------------


class OperatorCreate(Model):
    """A named operator account (its token is made by the NS and shown once)."""

    name: Name


class OperatorOut(Model):
    name: str
    created_at: float


class OperatorCredentials(Model):
    name: str
    token: str


class AuditEventOut(Model):
    """One operator action: who (an operator's name, or "admin"), when, what, on what."""

    id: int
    at: float
    who: str
    action: str
    target: str
    detail: dict[str, Any]


class RunSummary(Model):
    """A run in the list of runs: what ran, when, and how many executions are in each status."""

    id: int
    created_at: float
    task_id: int | None
    job_id: int | None
    what: str  # "task NAME" or "job NAME"
    total: int
    statuses: dict[str, int]
