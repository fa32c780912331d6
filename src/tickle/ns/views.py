"""Rows → messages: how the NS shows its tables on the wire (read inside the row's session).

A message whose fields are all columns of the same names is read off the row (`from_attributes`);
the others say what they derive.

Clock offsets: a task server's is measured against the NS's clock; a computer's against its task
server's, so the computer's offset from the NS is the sum of both. Timeline steps timed by a clock
measured `clock.CORRECTION_MIN_S` or more off the NS's are shown on the NS's clock, and say so.
"""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import Row

from tickle import messages as m
from tickle.clock import CORRECTION_MIN_S
from tickle.ns.models import Computer, Execution, Job, Run, Settings, Task, TaskServer

# the execution column holding each timeline step's time
_TIMELINE_COLUMNS = {step: f"{step}_at" for step in m.TIMELINE_STEPS} | {
    "cached_at_ts": "cached_at_ts"
}
# the steps timed by the agent's clock, and those timed by its task server's
_AGENT_STEPS = frozenset({"started", "finished"})
_TS_STEPS = frozenset({"agent_tickled", "agent_pulled", "cached_at_ts"})


def task_out(t: Task) -> m.TaskOut:
    return m.TaskOut.model_validate(t, from_attributes=True)


def job_out(job: Job) -> m.JobOut:
    return m.JobOut(id=job.id, name=job.name, task_ids=[jt.task_id for jt in job.tasks])


def task_spec(task: Task | Row[Any]) -> dict[str, Any]:
    """What an execution keeps of a task when it is created (JSON, as stored); the task as an
    ORM object or a row of its columns."""
    return m.TaskSpec.model_validate(task, from_attributes=True).model_dump(mode="json")


def run_out(run: Run) -> m.RunOut:
    return m.RunOut(
        id=run.id,
        created_at=run.created_at,
        task_id=run.task_id,
        job_id=run.job_id,
        executions=[execution_out(ex) for ex in run.executions],
        label=run.label,
        expires_at=run.expires_at,
    )


def execution_out(ex: Execution) -> m.ExecutionOut:
    ts = ex.computer.task_server
    ts_offset = ts.clock_offset_s if ts is not None else None
    offsets = {
        **dict.fromkeys(_TS_STEPS, ts_offset),
        **dict.fromkeys(_AGENT_STEPS, _ns_offset(ex.computer)),
    }
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
            "timeline": _causal(
                [
                    _timeline_step(step, getattr(ex, _TIMELINE_COLUMNS[step]), offsets.get(step))
                    for step in m.TIMELINE_STEPS
                ]
            ),
            "cancel_requested_at": ex.cancel_requested_at,
            "expires_at": ex.expires_at,
        }
    )


def new_execution_out(
    execution_id: int,
    run_id: int,
    computer: str,
    task_server: str | None,
    timeline: list[m.TimelineStep],
    expires_at: float | None,
) -> m.ExecutionOut:
    """`execution_out` of an execution just created (pending, its `new_timeline`), without its
    row."""
    return m.ExecutionOut(
        id=execution_id,
        run_id=run_id,
        computer=computer,
        task_server=task_server,
        status="pending",
        timeline=timeline,
        expires_at=expires_at,
    )


def new_timeline(created_at: float) -> list[m.TimelineStep]:
    """The timeline of an execution just created: only its creation timed (no step to correct);
    the same steps for every execution of a run (shared: the messages are not changed)."""
    return [
        m.TimelineStep(step=step, at=created_at if step == "created" else None)
        for step in m.TIMELINE_STEPS
    ]


def execution_work(row: Any, steps: list[m.TaskSpec]) -> m.ExecutionWork:
    """The job information a task server pulls for one execution (a Core row: id, kind,
    expires_at, and its computer's name; its steps read)."""
    return m.ExecutionWork(
        execution_id=row.id,
        computer=row.name,
        kind="job" if row.kind == "job" else "task",
        steps=steps,
        expires_at=row.expires_at,
    )


def task_server_out(t: TaskServer, clients: int) -> m.TaskServerOut:
    return m.TaskServerOut(
        name=t.name,
        tickle_host=t.tickle_host,
        tickle_port=t.tickle_port,
        api_url=t.api_url,
        tickle_state=_state(t.tickle_state),
        last_pull_at=t.last_pull_at,
        clients=clients,
        clock_offset_s=t.clock_offset_s,
    )


def computer_out(c: Computer, online_since: float) -> m.ComputerOut:
    """The computer as the operator sees it; online when its last contact is after
    `online_since` (see `tickle.ns.liveness`)."""
    online = c.last_contact_at is not None and c.last_contact_at >= online_since
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
        clock_offset_s=_ns_offset(c),
        liveness="online" if online else "offline",
        settings_version=c.settings_version,
    )


def client_info(c: Computer) -> m.ClientInfo:
    """What a task server needs to know of one of its clients."""
    return m.ClientInfo.model_validate(c, from_attributes=True)


def settings_out(row: Settings) -> m.SettingsOut:
    return m.SettingsOut.model_validate(row, from_attributes=True)


def _ns_offset(c: Computer) -> float | None:
    """How far the computer's clock is ahead of the NS's: ahead of its task server's, plus the
    task server's (when measured)."""
    if c.clock_offset_s is None:
        return None
    ts_offset = c.task_server.clock_offset_s if c.task_server is not None else None
    return round(c.clock_offset_s + (ts_offset or 0.0), 3)


def _timeline_step(step: str, at: float | None, offset: float | None) -> dict[str, Any]:
    """A timeline step, on the NS's clock when its own clock is measured off."""
    if at is None or offset is None or abs(offset) < CORRECTION_MIN_S:
        return {"step": step, "at": at}
    return {"step": step, "at": at - offset, "corrected": True, "clock_offset_s": offset}


def _causal(timeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """No corrected step later than a step after it: an event was sent before it was received.

    An offset is measured from the least delayed of a peer's requests, and what delay is left in
    that sample makes the offset short and the corrected times late, by about the delay of
    loopback or the network: a `finished` corrected past the task server's `cached_at_ts` or the
    NS's `recorded` is shown at that step's time (still marked corrected)."""
    bound = math.inf
    for step in reversed(timeline):
        at = step["at"]
        if at is None:
            continue
        if step.get("corrected") and at > bound:
            step["at"] = at = bound
        bound = min(bound, at)
    return timeline


def _state(value: str) -> m.TickleState:
    if value in ("reachable", "unreachable", "cem", "clock_skewed"):
        return value  # type: ignore[return-value]
    return "unknown"
