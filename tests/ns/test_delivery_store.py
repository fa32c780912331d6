"""The delivery store's bulk paths (Core, no ORM object per row) against what the NS shows later:
a run as run now answers it is the run as read back, executions in the order the computers were
chosen; a pull stamps and notes what it gives; a batch of status events records each event once
and only from a task server it concerns. Shared with tests/postgres (PostgreSQL's paths)."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tickle import agentapi
from tickle import messages as m
from tickle.ns.credentials import Caller, token_sha256
from tickle.ns.models import StatusEvent
from tickle.ns.stores import Stores


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    stores = Stores.open(f"sqlite:///{tmp_path / 'ns.db'}")
    stores.database.migrate()
    try:
        yield stores
    finally:
        stores.close()


def task_server(stores: Stores, name: str = "ts1") -> Caller:
    """A task server registered in `stores`, as it calls the NS."""
    reg = m.TaskServerRegister(enrollment_secret="x" * 16, name=name, tickle_host="127.0.0.1",
                               tickle_port=9, api_url="http://127.0.0.1:9")  # fmt: skip
    creds = stores.inventory.register_task_server(reg, "ns")
    caller = stores.inventory.caller_for(token_sha256(creds.token))
    assert caller is not None
    return caller


def fleet(stores: Stores, computers: int = 4) -> Caller:
    """A task server with `computers` clients c0.. (the even ones in group "even")."""
    ts = task_server(stores)
    for i in range(computers):
        groups = ["even"] if i % 2 == 0 else []
        stores.inventory.register_agent(ts, m.AgentRegistration(name=f"c{i}", groups=groups))
    return ts


def check_run_now_answers_the_run_as_read_back(stores: Stores) -> None:
    ts = fleet(stores)
    t1 = stores.catalog.create_task(m.TaskCreate(name="t1", command=["true"]))
    t2 = stores.catalog.create_task(m.TaskCreate(name="t2", script="exit 0"))
    job = stores.catalog.create_job(m.JobCreate(name="j", task_ids=[t2.id, t1.id]))
    for body in (
        m.RunCreate(task_id=t1.id, computers=["c3", "c1"], groups=["even"], expires_in_s=60),
        m.RunCreate(job_id=job.id, all_computers=True),
        m.RunCreate(task=m.TaskSpec(name="adhoc", command=["id"]), computers=["c2"]),
    ):
        run = stores.delivery.create_run(body)
        assert run == stores.delivery.run(run.id)
        if body.task_id is not None:  # named first, in their order; then the group's
            assert [e.computer for e in run.executions] == ["c3", "c1", "c0", "c2"]
    (work,) = [
        w
        for w in stores.delivery.pull_work(ts, time.time(), "check").executions
        if w.computer == "c2" and w.steps[0].name == "adhoc"
    ]
    assert work.steps == [m.TaskSpec(name="adhoc", command=["id"])]


def test_run_now_answers_the_run_as_read_back(stores: Stores) -> None:
    check_run_now_answers_the_run_as_read_back(stores)


def _event(execution: m.ExecutionOut, kind: str, **fields: Any) -> m.StatusEvent:
    fields = {"at": time.time(), "computer": execution.computer} | fields
    return m.StatusEvent(event_id=str(uuid.uuid4()), execution_id=execution.id, kind=kind, **fields)


def check_a_batch_records_each_event_once_and_only_from_its_task_server(stores: Stores) -> None:
    ts = fleet(stores, computers=2)
    other = task_server(stores, "ts2")
    task = stores.catalog.create_task(m.TaskCreate(name="t", command=["true"]))
    e0, e1 = stores.delivery.create_run(
        m.RunCreate(task_id=task.id, computers=["c0", "c1"])
    ).executions
    pulled = _event(e0, "agent_pulled", via="tickle")
    started = _event(e0, "started")
    unknown = m.StatusEvent(event_id=str(uuid.uuid4()), execution_id=e1.id + 1000,
                            computer="c0", kind="started", at=time.time())  # fmt: skip
    misnamed = _event(e1, "started", computer="c0")  # not the execution's computer: refused
    # times JSON cannot carry (a foreign task server's): recorded as they are
    finished = _event(e0, "finished", step=0, exit_code=0, status="succeeded", stdout="out",
                      stderr="", at=math.inf, cached_at=-math.inf, step_started_at=math.nan)  # fmt: skip
    batch = [pulled, pulled, started, unknown, misnamed, finished]

    outcome = stores.delivery.record_events(ts, batch, time.time())
    again = stores.delivery.record_events(ts, batch, time.time())
    # a task server neither serving c1 nor given its execution by a pull
    foreign = stores.delivery.record_events(other, [_event(e1, "started")], time.time())

    ids = [e.event_id for e in (pulled, pulled, started, unknown, finished)]
    assert outcome.accepted == ids
    assert outcome.recorded == [pulled, started, finished]
    assert outcome.finished == ["succeeded"]
    assert again.accepted == ids
    assert again.recorded == again.finished == []
    assert foreign.accepted == foreign.recorded == []
    execution = stores.delivery.execution(e0.id)
    assert execution.status == "succeeded"
    (step,) = execution.steps
    assert (step.exit_code, step.finished_at) == (0, math.inf)
    assert step.started_at is not None
    assert math.isnan(step.started_at)
    assert [o.stdout for o in stores.output.output(e0.id).steps] == ["out"]
    assert stores.delivery.execution(e1.id).status == "pending"
    with stores.database.reading() as s:
        counts = dict(
            s.execute(
                select(StatusEvent.execution_id, func.count()).group_by(StatusEvent.execution_id)
            ).all()
        )
    assert counts == {e0.id: 3}


def test_a_batch_records_each_event_once_and_only_from_its_task_server(stores: Stores) -> None:
    check_a_batch_records_each_event_once_and_only_from_its_task_server(stores)


def test_a_batch_larger_than_one_insert_records_every_event_once(stores: Stores) -> None:
    """SQLite writes a batch's events in INSERTs of at most 1,000 rows: one of 1,500 (more than
    the API takes in a post) is recorded whole, each event once, and moves every execution."""
    ts = fleet(stores, computers=500)
    task = stores.catalog.create_task(m.TaskCreate(name="t", command=["true"]))
    run = stores.delivery.create_run(m.RunCreate(task_id=task.id, all_computers=True))
    batch = [
        _event(e, kind, **({"status": "succeeded", "exit_code": 0} if kind == "finished" else {}))
        for e in run.executions
        for kind in ("agent_pulled", "started", "finished")
    ]
    outcome = stores.delivery.record_events(ts, batch, time.time())
    again = stores.delivery.record_events(ts, batch[::-1], time.time())
    assert len(outcome.recorded) == len(outcome.accepted) == len(batch) == 1500
    assert len(outcome.finished) == 500
    assert again.recorded == []
    assert len(again.accepted) == 1500
    assert {e.status for e in stores.delivery.run(run.id).executions} == {"succeeded"}
    with stores.database.reading() as s:
        assert s.scalar(select(func.count()).select_from(StatusEvent)) == 1500


def check_an_event_read_by_the_fast_path_is_recorded_as_the_routes_one(stores: Stores) -> None:
    """The NS's fast path reads events with msgspec (`tickle.agentapi`), the route with pydantic:
    recorded alike (the row's body without the output, the output in its step's row, the
    execution moved)."""
    ts = fleet(stores, computers=2)
    task = stores.catalog.create_task(m.TaskCreate(name="t", command=["true"]))
    e0, e1 = stores.delivery.create_run(
        m.RunCreate(task_id=task.id, computers=["c0", "c1"])
    ).executions
    fields = {"at": 1.5, "step": 0, "exit_code": 2, "status": "failed", "stdout": "out", "stderr": "err",
              "output_tail": "tail", "cached_at": 2.5, "step_started_at": math.inf}  # fmt: skip
    route = _event(e0, "finished", **fields)
    fast = agentapi.decode(_event(e1, "finished", **fields).model_dump_json(), agentapi.StatusEvent)
    outcome = stores.delivery.record_events(ts, [route, fast], time.time())
    assert outcome.recorded == [route, fast]
    assert outcome.finished == ["failed", "failed"]
    with stores.database.reading() as s:
        bodies = dict(s.execute(select(StatusEvent.event_id, StatusEvent.body)).all())
    drop = {"event_id", "execution_id", "computer"}
    fast_body, route_body = bodies[fast.event_id], bodies[route.event_id]
    assert {k: v for k, v in fast_body.items() if k not in drop} == {
        k: v for k, v in route_body.items() if k not in drop
    }
    assert "stdout" not in fast_body
    for execution in (e0, e1):
        assert stores.delivery.execution(execution.id).status == "failed"
        assert [(o.stdout, o.stderr) for o in stores.output.output(execution.id).steps] == [
            ("out", "err")
        ]


def test_an_event_read_by_the_fast_path_is_recorded_as_the_routes_one(stores: Stores) -> None:
    check_an_event_read_by_the_fast_path_is_recorded_as_the_routes_one(stores)


def check_a_step_reported_again_keeps_its_last_output(stores: Stores) -> None:
    """A step's output reported again (in the same batch or a later one) replaces the one kept;
    each step and execution keeps its own."""
    ts = fleet(stores, computers=2)
    task = stores.catalog.create_task(m.TaskCreate(name="t", command=["true"]))
    e0, e1 = stores.delivery.create_run(
        m.RunCreate(task_id=task.id, computers=["c0", "c1"])
    ).executions

    def output(e: m.ExecutionOut, step: int, text: str) -> m.StatusEvent:
        return _event(e, "step_finished", step=step, exit_code=0, stdout=text, stderr=f"{text}!")

    stores.delivery.record_events(
        ts, [output(e0, 0, "first"), output(e0, 0, "second"), output(e1, 0, "other")], time.time()
    )
    stores.delivery.record_events(ts, [output(e0, 0, "third"), output(e0, 1, "next")], time.time())
    kept = [(o.stdout, o.stderr) for o in stores.output.output(e0.id).steps]
    assert kept == [("third", "third!"), ("next", "next!")]
    assert [o.stdout for o in stores.output.output(e1.id).steps] == ["other"]


def test_a_step_reported_again_keeps_its_last_output(stores: Stores) -> None:
    check_a_step_reported_again_keeps_its_last_output(stores)
