"""Every JSON body that crosses HTTP between the components (and the operator's API).

Both sides of each exchange import these models, so a field changes in one place — except the
agent, which loads no pydantic: its bodies are tickle.agentapi's msgspec Structs, which
tests/shared/test_agentapi.py proves equal to these. Bad input gets a validation error that names
the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tickle import __version__
from tickle import agentapi as _api

# The limits and the literals of what agents send and receive are tickle.agentapi's (the agent's
# own msgspec Structs of these bodies); tests/shared/test_agentapi.py proves both sides agree.
COMMAND_MAX = _api.COMMAND_MAX
DB_INT_MAX = _api.DB_INT_MAX
DB_INT_MIN = _api.DB_INT_MIN
EVENT_BATCH_MAX = _api.EVENT_BATCH_MAX
EVENT_ID_MAX = _api.EVENT_ID_MAX
EVENT_ID_MIN = _api.EVENT_ID_MIN
GROUPS_MAX = _api.GROUPS_MAX
HOST_MAX = _api.HOST_MAX
IDENTITY_MAX = _api.IDENTITY_MAX
IDENTITY_MIN = _api.IDENTITY_MIN
LONG_POLL_TIMEOUT_MAX_S = _api.LONG_POLL_TIMEOUT_MAX_S
LONG_POLL_TIMEOUT_MIN_S = _api.LONG_POLL_TIMEOUT_MIN_S
LONG_POLL_TIMEOUT_S = _api.LONG_POLL_TIMEOUT_S
NAME_MAX = _api.NAME_MAX
NAME_PATTERN = _api.NAME_PATTERN
OUTPUT_MAX_BYTES = _api.OUTPUT_MAX_BYTES
OUTPUT_MAX_CHARS = _api.OUTPUT_MAX_CHARS
OUTPUT_TAIL_MAX = _api.OUTPUT_TAIL_MAX
PORT_MAX = _api.PORT_MAX
PORT_MIN = _api.PORT_MIN
SCRIPT_MAX = _api.SCRIPT_MAX
SECRET_MAX = _api.SECRET_MAX
TASK_REQUEST_INTERVAL_MAX_S = _api.TASK_REQUEST_INTERVAL_MAX_S
TASK_REQUEST_INTERVAL_MIN_S = _api.TASK_REQUEST_INTERVAL_MIN_S
TASK_TIMEOUT_MAX_S = _api.TASK_TIMEOUT_MAX_S
EventKind = _api.EventKind
ExecutionStatus = _api.ExecutionStatus
PolicyVia = _api.PolicyVia
PullVia = _api.PullVia
Name = Annotated[str, Field(min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN)]
Port = Annotated[int, Field(ge=PORT_MIN, le=PORT_MAX)]
# a secret an agent or task server makes once and keeps in its state: its stable identity. The NS
# keeps its SHA-256; a registration under a registered name must present the same one.
Identity = Annotated[str, Field(min_length=IDENTITY_MIN, max_length=IDENTITY_MAX)]
DbInt = Annotated[int, Field(ge=DB_INT_MIN, le=DB_INT_MAX)]
TaskRequestIntervalS = Annotated[
    int, Field(ge=TASK_REQUEST_INTERVAL_MIN_S, le=TASK_REQUEST_INTERVAL_MAX_S)
]
LongPollTimeoutS = Annotated[int, Field(ge=LONG_POLL_TIMEOUT_MIN_S, le=LONG_POLL_TIMEOUT_MAX_S)]
# clock_skewed: its clock is further off than the tickle freshness window, so it rejects (or its
# receiver rejects) every tickle as stale — not a firewall, a clock to set right
TickleState = Literal["unknown", "reachable", "unreachable", "cem", "clock_skewed"]
# a peer's clock offset as measured and reported (seconds; positive: its clock is ahead)
ClockOffsetS = Annotated[float, Field(ge=-1e9, le=1e9, allow_inf_nan=False)]
Liveness = Literal["online", "offline"]
FINAL_STATUSES: frozenset[str] = frozenset(
    {"succeeded", "failed", "timed_out", "interrupted", "cancelled", "expired", "lost"}
)
# the statuses `tickle run --rerun RUN --failed` runs again
RERUN_STATUSES: frozenset[str] = frozenset(
    {"failed", "timed_out", "interrupted", "cancelled", "expired", "lost"}
)
# why a task server pulls from the NS: a tickle, its periodic check, or its start
TsPullVia = Literal["tickle", "check", "start"]
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
    command: list[str] | None = Field(default=None, min_length=1, max_length=COMMAND_MAX)
    script: str | None = Field(default=None, min_length=1, max_length=SCRIPT_MAX)
    timeout_s: float = Field(default=300.0, gt=0, le=TASK_TIMEOUT_MAX_S)

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


# the longest a run may wait for its computers before its unstarted executions expire
RUN_EXPIRY_MAX_S = 366 * 86400


class RunCreate(Model):
    """Run a task or a job now on named computers and/or groups, or on every computer; or an
    ad-hoc command, its task given inline (`task`): it is kept with the run only, never added to
    the defined tasks."""

    task_id: DbInt | None = None
    job_id: DbInt | None = None
    task: TaskSpec | None = None
    computers: list[Name] = Field(default_factory=list, max_length=100_000)
    groups: list[Name] = Field(default_factory=list, max_length=1000)
    all_computers: bool = Field(default=False, description="Run on every registered computer")
    expires_in_s: float | None = Field(
        default=None,
        gt=0,
        le=RUN_EXPIRY_MAX_S,
        description="Executions not started this many seconds after the run end `expired` "
        "(default: the NS's default_run_expiry_s)",
    )

    @model_validator(mode="after")
    def _one_target(self) -> RunCreate:
        if sum(x is not None for x in (self.task_id, self.job_id, self.task)) != 1:
            raise ValueError("give exactly one of 'task_id', 'job_id' or 'task'")
        if not self.computers and not self.groups and not self.all_computers:
            raise ValueError("give at least one computer or group, or all_computers")
        return self


class TimelineStep(Model):
    """One step of an execution's timeline.

    A step timed by an agent's or task server's clock that is measured off the NS's by
    `clock.CORRECTION_MIN_S` or more is shown corrected: `at` is the NS's time, `corrected` is
    true and `clock_offset_s` says by how much that clock is ahead (`at` = its time - offset).
    """

    step: str
    at: float | None
    corrected: bool = False
    clock_offset_s: float | None = None


class StepResult(Model):
    step: int
    name: str
    exit_code: int | None
    status: str
    started_at: float | None = None
    finished_at: float | None = None


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
    cancel_requested_at: float | None = None
    expires_at: float | None = None

    def settled(self) -> bool:
        """Final, with the hops before its end recorded too: a task server posts two batches of
        events at once, so an agent's `finished` may reach the NS before the `agent_pulled` (and
        the `via` it carries) that came before it, a moment later."""
        if self.status not in FINAL_STATUSES:
            return False
        at = {s.step: s.at for s in self.timeline}
        return at.get("started") is None or at.get("agent_pulled") is not None


class RunOut(Model):
    id: int
    created_at: float
    task_id: int | None
    job_id: int | None
    executions: list[ExecutionOut]
    label: str | None = None  # the task's or job's name when the run was made
    expires_at: float | None = None


class RunSummary(Model):
    """A run in the history list: what ran, when, and how many executions are in each status."""

    id: int
    created_at: float
    task_id: int | None
    job_id: int | None
    label: str | None
    executions: int
    statuses: dict[str, int]


class RunsPage(Model):
    """A page of runs, newest first; `next_before`: pass it as `before` for the next page."""

    runs: list[RunSummary]
    next_before: int | None


class ExecutionsPage(Model):
    """A page of executions, newest first; `next_before`: pass it as `before` for the next page."""

    executions: list[ExecutionOut]
    next_before: int | None


class CancelOut(Model):
    """What a cancel did to each execution it named."""

    run_id: int
    cancelled: list[int] = Field(description="not started: ended `cancelled` now")
    stopping: list[int] = Field(
        description="pulled by their agent: it stops them and reports `cancelled`"
    )
    already_final: list[int] = Field(description="had ended before: left as they were")


class StepOutput(Model):
    step: int
    name: str
    stdout: str
    stderr: str


class ExecutionOutputOut(Model):
    """Each step's output as its agent kept it (cut at its cap, with a marker where it was)."""

    execution_id: int
    steps: list[StepOutput]


# --- inventory views --------------------------------------------------------------------------


class TaskServerOut(Model):
    name: str
    tickle_host: str
    tickle_port: int
    api_url: str
    tickle_state: TickleState
    last_pull_at: float | None
    clients: int
    clock_offset_s: float | None = Field(
        default=None, description="how far its clock is ahead of the NS's (s; null: unmeasured)"
    )


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
    clock_offset_s: float | None = Field(
        default=None,
        description="how far its clock is ahead of the NS's (s; its offset from its task "
        "server's plus the task server's; null: unmeasured)",
    )
    # offline: no contact within 2 x its Task Request Interval + slack (`offline_after_s`)
    liveness: Liveness = "offline"
    settings_version: int | None = None  # the version its agent has (None: not reported yet)


RegistrationKind = Literal["computer", "task_server"]
RegistrationState = Literal["pending", "approved", "rejected"]


class RegistrationOut(Model):
    """A registration an operator decides on (registration_approval = manual), or rejected."""

    kind: RegistrationKind
    name: str
    state: RegistrationState
    identity: str | None = Field(description="First 16 hex digits of the identity's SHA-256")
    task_server: str | None = Field(description="The task server an agent registered through")
    address: str | None = Field(description="Where the request came from, as far as seen")
    requested_at: float
    last_seen_at: float
    decided_at: float | None


class Rekeyed(Model):
    """A computer or task server whose next registration may bring a new identity."""

    kind: RegistrationKind
    name: str


class SettingsOut(Model):
    version: int
    task_request_interval_s: int
    poll_jitter_fraction: float
    ts_check_interval_s: int
    # agents that cannot be tickled (CEM, tickle-unreachable) hold a long-poll open (off: poll)
    long_poll: bool = False
    long_poll_timeout_s: int = LONG_POLL_TIMEOUT_S


class SettingsUpdate(Model):
    """A change of the central settings; a field left out (or null) keeps its value."""

    task_request_interval_s: TaskRequestIntervalS | None = Field(
        default=None, description="Task Request Interval: how often agents poll (s)"
    )
    poll_jitter_fraction: float | None = Field(default=None, ge=0.0, le=0.5)
    ts_check_interval_s: int | None = Field(default=None, ge=5, le=86400)
    long_poll: bool | None = Field(
        default=None,
        description="agents that cannot be tickled (CEM, tickle-unreachable) hold a long-poll "
        "open to their task server and start work within a second",
    )
    long_poll_timeout_s: LongPollTimeoutS | None = Field(
        default=None, description="how long a long-poll waits before it returns empty (s)"
    )


class SettingsReach(Model):
    """How far the current settings version has reached the agents."""

    version: int
    current: int  # agents whose last contact reported this version
    pending: int  # agents that take it at their next contact


# --- task server <-> notification server ------------------------------------------------------


class TaskServerRegister(Model):
    enrollment_secret: str = Field(min_length=1, max_length=512)
    name: Name
    tickle_host: str = Field(min_length=1, max_length=255)
    tickle_port: Port = 50123
    api_url: str = Field(min_length=1, max_length=2048)
    identity: Identity | None = None


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
    identity: Identity | None = None


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
    expires_at: float | None = None  # not started by then: not started at all


class WorkOut(Model):
    executions: list[ExecutionWork]
    # executions an operator cancelled lately: never start them, stop them where they run
    cancel: list[int] = Field(default_factory=list)


class StatusEvent(Model):
    event_id: str = Field(min_length=EVENT_ID_MIN, max_length=EVENT_ID_MAX)
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
    # a step's whole output, cut at the agent's cap (`step_finished`, and `finished` of a task)
    stdout: str | None = Field(default=None, max_length=OUTPUT_MAX_CHARS)
    stderr: str | None = Field(default=None, max_length=OUTPUT_MAX_CHARS)
    step_started_at: float | None = None

    @model_validator(mode="after")
    def _output_within_cap(self) -> StatusEvent:
        if len(self.stdout or "") + len(self.stderr or "") > OUTPUT_MAX_CHARS:
            raise ValueError(f"stdout and stderr together exceed {OUTPUT_MAX_CHARS} characters")
        return self

    def without_output(self) -> StatusEvent | None:
        """This event with its step's output replaced by a note (None: it carries none) — for
        a next hop whose `max_body_bytes` it exceeds alone: the status still gets through."""
        if not self.stdout and not self.stderr:
            return None
        return self.model_copy(
            update={"stdout": "", "stderr": _api.dropped_output(self.stdout, self.stderr)}
        )


class EventBatch(Model):
    events: list[StatusEvent] = Field(max_length=EVENT_BATCH_MAX)


class EventAck(Model):
    accepted: list[str]


class ComputerState(Model):
    """What a task server saw of one client, as of `at`; `contact_at`: the agent's last contact
    (poll, pull, policy fetch, status event) — a tickle that got no answer is none."""

    name: Name
    tickle_state: TickleState | None = None
    observed_address: str | None = None
    clock_offset_s: ClockOffsetS | None = Field(
        default=None, description="how far its clock is ahead of the task server's (s)"
    )
    at: float
    contact_at: float | None = None
    settings_version: DbInt | None = None  # the settings version the agent has


class ComputerStatesAck(Model):
    updated: int
    forgotten: list[str] = Field(default_factory=list)  # unknown to the NS: drop their credentials


# --- agent <-> task server --------------------------------------------------------------------


class AgentPolicy(Model):
    """The agent's configuration policy. It never carries tasks.

    `long_poll`: whether this agent is to hold a long-poll open (the setting is on and the agent
    cannot be tickled: CEM, or tickle-unreachable)."""

    settings_version: int
    task_request_interval_s: int
    poll_jitter_fraction: float
    cem: bool
    long_poll: bool = False
    long_poll_timeout_s: int = LONG_POLL_TIMEOUT_S


class AgentRegister(Model):
    enrollment_secret: str = Field(min_length=1, max_length=SECRET_MAX)
    name: Name
    tickle_host: str | None = Field(default=None, max_length=HOST_MAX)
    tickle_port: Port = 50124
    cem: bool = False
    reported_address: str | None = Field(default=None, max_length=HOST_MAX)
    groups: list[Name] = Field(default_factory=list, max_length=GROUPS_MAX)
    identity: Identity | None = None


class AgentEnrollment(Model):
    name: str
    token: str
    tickle_key: str  # base64
    ts_name: str
    policy: AgentPolicy


class AgentTasks(Model):
    executions: list[ExecutionWork]
    policy: AgentPolicy
    # executions of this agent an operator cancelled: not to start, or to stop where they run
    cancel: list[int] = Field(default_factory=list)


class Health(Model):
    status: Literal["ok"] = "ok"
    component: str
    # the software version the process runs (playbooks/upgrade.yml waits for the new one)
    version: str = __version__


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
