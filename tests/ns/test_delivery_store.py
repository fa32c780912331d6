"""The delivery store's bulk paths (Core, no ORM object per row) against what the NS shows later:
a run as run now answers it is the run as read back, executions in the order the computers were
chosen; a pull stamps and notes what it gives. Shared with tests/postgres (PostgreSQL's paths)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tickle import messages as m
from tickle.ns.credentials import Caller, token_sha256
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
