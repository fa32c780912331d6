"""The JSON bodies an agent exchanges with its task server, as msgspec Structs: the agent encodes,
decodes and validates them without pydantic (S7 of issue 10: pydantic was 17 MB of the agent's
memory at rest).

The task server keeps the pydantic models of the same names in `tickle.messages`, which take their
limits from here. tests/shared/test_agentapi.py proves both agree — the same fields, defaults and
constraints (their JSON Schemas), and full bodies decoded and encoded both ways — so they cannot
drift apart.
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct, field

# --- limits shared with tickle.messages ---------------------------------------------------------

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
NAME_MAX = 64
PORT_MIN, PORT_MAX = 1, 65535
IDENTITY_MIN, IDENTITY_MAX = 16, 128
# integers the NS stores in INTEGER columns (32-bit on PostgreSQL; larger ones crash SQLite too)
DB_INT_MIN, DB_INT_MAX = -(2**31), 2**31 - 1
# How often agents poll their task server when no tickle reaches them. Below 10 s a fleet's polls
# would swamp its task servers (10,000 agents: 1,000 requests/s); a day is the longest.
TASK_REQUEST_INTERVAL_MIN_S, TASK_REQUEST_INTERVAL_MAX_S = 10, 86400
# How long an agent's long-poll waits at its task server before it returns empty: below the idle
# timeout of any proxy or NAT on the way (60 s is common), 5 s at least (a shorter one is a poll).
LONG_POLL_TIMEOUT_S = 55
LONG_POLL_TIMEOUT_MIN_S, LONG_POLL_TIMEOUT_MAX_S = 5, 600
OUTPUT_TAIL_MAX = 4096
# The largest output of one step (stdout and stderr together) an agent may keep and send: its
# `output_max_bytes` is at most this. Characters on the wire (a cut adds a marker line of its own).
# One status event carrying it stays far within the default `max_body_bytes` (8 MiB) even when
# JSON escapes control characters (6 bytes each).
OUTPUT_MAX_BYTES = 1024 * 1024
OUTPUT_MAX_CHARS = OUTPUT_MAX_BYTES + 256
SECRET_MAX = 512
HOST_MAX = 255
GROUPS_MAX = 64
EVENT_BATCH_MAX = 1000
SCRIPT_MAX = 65536
COMMAND_MAX = 256
TASK_TIMEOUT_MAX_S = 86400
EVENT_ID_MIN, EVENT_ID_MAX = 8, 64

Name = Annotated[str, Meta(min_length=1, max_length=NAME_MAX, pattern=NAME_PATTERN)]
Port = Annotated[int, Meta(ge=PORT_MIN, le=PORT_MAX)]
Identity = Annotated[str, Meta(min_length=IDENTITY_MIN, max_length=IDENTITY_MAX)]
DbInt = Annotated[int, Meta(ge=DB_INT_MIN, le=DB_INT_MAX)]
TaskRequestIntervalS = Annotated[
    int, Meta(ge=TASK_REQUEST_INTERVAL_MIN_S, le=TASK_REQUEST_INTERVAL_MAX_S)
]
Host = Annotated[str, Meta(max_length=HOST_MAX)]

ExecutionStatus = Literal[
    "pending",
    "delivered",
    "running",
    "succeeded",
    "failed",
    "timed_out",
    "interrupted",
    "cancelled",
    "expired",
    "lost",
]
EventKind = Literal["agent_tickled", "agent_pulled", "started", "step_finished", "finished"]
PullVia = Literal["tickle", "poll", "check_now", "long_poll"]
PolicyVia = Literal["tickle", "refresh"]


class Body(Struct, kw_only=True, forbid_unknown_fields=True):
    """Strict base: unknown fields are an error, so typos are named, not ignored."""


class TaskSpec(Body):
    """What an agent runs: a command (argv) or a shell script, with a timeout."""

    name: Name
    command: Annotated[list[str], Meta(min_length=1, max_length=COMMAND_MAX)] | None = None
    script: Annotated[str, Meta(min_length=1, max_length=SCRIPT_MAX)] | None = None
    timeout_s: Annotated[float, Meta(gt=0, le=TASK_TIMEOUT_MAX_S)] = 300.0

    def __post_init__(self) -> None:
        if (self.command is None) == (self.script is None):
            raise ValueError("give exactly one of 'command' or 'script'")


class ExecutionWork(Body):
    """The job information for one execution: everything the agent needs to run it."""

    execution_id: int
    computer: str
    kind: Literal["task", "job"]
    steps: Annotated[list[TaskSpec], Meta(min_length=1)]
    expires_at: float | None = None  # not started by then: not started at all


class AgentPolicy(Body):
    """The agent's configuration policy. It never carries tasks.

    `long_poll`: whether this agent is to hold a long-poll open (the setting is on and the agent
    cannot be tickled: CEM, or tickle-unreachable)."""

    settings_version: int
    task_request_interval_s: int
    poll_jitter_fraction: float
    cem: bool
    long_poll: bool = False
    long_poll_timeout_s: int = LONG_POLL_TIMEOUT_S


class AgentRegister(Body):
    enrollment_secret: Annotated[str, Meta(min_length=1, max_length=SECRET_MAX)]
    name: Name
    tickle_host: Host | None = None
    tickle_port: Port = 50124
    cem: bool = False
    reported_address: Host | None = None
    groups: Annotated[list[Name], Meta(max_length=GROUPS_MAX)] = field(default_factory=list)
    identity: Identity | None = None


class AgentEnrollment(Body):
    name: str
    token: str
    tickle_key: str  # base64
    ts_name: str
    policy: AgentPolicy


class AgentTasks(Body):
    executions: list[ExecutionWork]
    policy: AgentPolicy
    # executions of this agent an operator cancelled: not to start, or to stop where they run
    cancel: list[int] = field(default_factory=list)


class StatusEvent(Body):
    event_id: Annotated[str, Meta(min_length=EVENT_ID_MIN, max_length=EVENT_ID_MAX)]
    execution_id: DbInt
    computer: Name
    kind: EventKind
    at: float
    cached_at: float | None = None
    step: Annotated[int, Meta(ge=0, le=DB_INT_MAX)] | None = None
    exit_code: DbInt | None = None
    status: ExecutionStatus | None = None
    output_tail: Annotated[str, Meta(max_length=OUTPUT_TAIL_MAX)] | None = None
    via: PullVia | None = None
    # a step's whole output, cut at the agent's cap (`step_finished`, and `finished` of a task)
    stdout: Annotated[str, Meta(max_length=OUTPUT_MAX_CHARS)] | None = None
    stderr: Annotated[str, Meta(max_length=OUTPUT_MAX_CHARS)] | None = None
    step_started_at: float | None = None

    def __post_init__(self) -> None:
        if len(self.stdout or "") + len(self.stderr or "") > OUTPUT_MAX_CHARS:
            raise ValueError(f"stdout and stderr together exceed {OUTPUT_MAX_CHARS} characters")

    def without_output(self) -> StatusEvent | None:
        """This event with its step's output replaced by a note (None: it carries none) — for
        a next hop whose `max_body_bytes` it exceeds alone: the status still gets through."""
        if not self.stdout and not self.stderr:
            return None
        return msgspec.structs.replace(
            self, stdout="", stderr=dropped_output(self.stdout, self.stderr)
        )


def dropped_output(stdout: str | None, stderr: str | None) -> str:
    """What an event says in place of its step's output (`StatusEvent.without_output`)."""
    sizes = f"{len(stdout or '')} characters of stdout and {len(stderr or '')} of stderr"
    return f"[tickle] {sizes} dropped: over the next hop's max_body_bytes\n"


class EventBatch(Body):
    events: Annotated[list[StatusEvent], Meta(max_length=EVENT_BATCH_MAX)]


class EventAck(Body):
    accepted: list[str]


# every body the agent sends or receives (tests/shared/test_agentapi.py checks each)
EXCHANGED = (
    TaskSpec,
    ExecutionWork,
    AgentPolicy,
    AgentRegister,
    AgentEnrollment,
    AgentTasks,
    StatusEvent,
    EventBatch,
    EventAck,
)

B = TypeVar("B", bound=Body)
_encoder = msgspec.json.Encoder()


def encode(body: Body) -> bytes:
    """A body as JSON (every field, defaults too, as the task server's pydantic models write)."""
    return _encoder.encode(body)


def decode(data: bytes | str, kind: type[B]) -> B:
    """A body of `kind` from JSON, validated; msgspec.ValidationError naming the field."""
    return msgspec.json.decode(data, type=kind)
