"""Rows → messages: how the NS shows its tables on the wire (read inside the row's session).

A message whose fields are all columns of the same names is read off the row (`from_attributes`);
the others say what they derive.
"""

from __future__ import annotations

from typing import Any

from tickle import messages as m
from tickle.ns.models import Computer, Execution, Job, Run, Settings, Task, TaskServer

# the execution column holding each timeline step's time
_TIMELINE_COLUMNS = {step: f"{step}_at" for step in m.TIMELINE_STEPS} | {
    "cached_at_ts": "cached_at_ts"
}


def task_out(t: Task) -> m.TaskOut:
    return m.TaskOut.model_validate(t, from_attributes=True)


def job_out(job: Job) -> m.JobOut:
    return m.JobOut(id=job.id, name=job.name, task_ids=[jt.task_id for jt in job.tasks])


def task_spec(task: Task) -> dict[str, Any]:
    """What an execution keeps of a task when it is created (JSON, as stored)."""
    return m.TaskSpec.model_validate(task, from_attributes=True).model_dump(mode="json")


def run_out(run: Run) -> m.RunOut:
    return m.RunOut(
        id=run.id,
        created_at=run.created_at,
        task_id=run.task_id,
        job_id=run.job_id,
        executions=[execution_out(ex) for ex in run.executions],
        expires_at=run.expires_at,
    )


def execution_out(ex: Execution) -> m.ExecutionOut:
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
            "cancel_requested_at": ex.cancel_requested_at,
            "expires_at": ex.expires_at,
        }
    )


def execution_work(ex: Execution) -> m.ExecutionWork:
    """The job information a task server pulls for one execution."""
    return m.ExecutionWork(
        execution_id=ex.id,
        computer=ex.computer.name,
        kind="job" if ex.kind == "job" else "task",
        steps=[m.TaskSpec.model_validate(step) for step in ex.steps],
        expires_at=ex.expires_at,
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
    )


def computer_out(c: Computer) -> m.ComputerOut:
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


def client_info(c: Computer) -> m.ClientInfo:
    """What a task server needs to know of one of its clients."""
    return m.ClientInfo.model_validate(c, from_attributes=True)


def settings_out(row: Settings) -> m.SettingsOut:
    return m.SettingsOut.model_validate(row, from_attributes=True)


def _state(value: str) -> m.TickleState:
    if value in ("reachable", "unreachable", "cem"):
        return value  # type: ignore[return-value]
    return "unknown"
