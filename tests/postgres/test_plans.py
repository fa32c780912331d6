"""The statements of the fleet's hot requests on PostgreSQL find their rows through an index: a
batch of status events and a batch of computer states must cost what the batch holds, not what
the tables hold (a scan of every execution per batch made a run-now on a fleet quadratic)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, text

from tests.ns.test_delivery_store import fleet
from tickle import messages as m
from tickle.ns.stores import Stores

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
COMPUTERS = 2_000  # enough rows that a scan of a whole table costs more than its index


@pytest.fixture
def stores(pg_url: str) -> Iterator[Stores]:
    stores = Stores.open(pg_url)
    stores.database.migrate()
    try:
        yield stores
    finally:
        stores.close()


def _statements(stores: Stores) -> tuple[list[tuple[str, Any]], Any]:
    """The statements the stores run from now on, with their parameters (and the listener)."""
    seen: list[tuple[str, Any]] = []

    def executed(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, many: bool) -> None:
        if not many and statement.lstrip().upper().startswith(("UPDATE", "WITH", "SELECT")):
            seen.append((statement, params))

    event.listen(stores.database.engine, "before_cursor_execute", executed)
    return seen, executed


def _scans(stores: Stores, statements: list[tuple[str, Any]], tables: set[str]) -> list[str]:
    """The plan lines of these statements that scan a whole one of `tables`."""
    found = []
    with stores.database.engine.connect() as conn:
        for statement, params in statements:
            plan = conn.exec_driver_sql("EXPLAIN " + statement, params).scalars().all()
            found += [
                f"{line.strip()} in: {statement[:80]}"
                for line in plan
                if any(f"Seq Scan on {table} " in line for table in tables)
            ]
        conn.rollback()
    return found


def test_a_batch_of_status_events_and_of_states_finds_its_rows_by_index(stores: Stores) -> None:
    ts = fleet(stores, COMPUTERS)
    task = stores.catalog.create_task(m.TaskCreate(name="t", command=["true"]))
    run = stores.delivery.create_run(m.RunCreate(task_id=task.id, all_computers=True))
    stores.delivery.pull_work(ts, time.time(), "tickle")
    with stores.database.engine.connect() as conn:  # as autovacuum does after such a change
        conn.exec_driver_sql("ANALYZE")
        conn.commit()
    some = run.executions[:40]
    events = [
        m.StatusEvent(
            event_id=str(uuid.uuid4()),
            execution_id=e.id,
            computer=e.computer,
            kind=kind,
            at=time.time(),
            **fields,
        )
        for e in some
        for kind, fields in (("agent_pulled", {"via": "tickle"}), ("started", {}))
    ]
    states = [
        m.ComputerState(name=e.computer, at=time.time(), tickle_state="unreachable") for e in some
    ]
    seen, listener = _statements(stores)
    try:
        outcome = stores.delivery.record_events(ts, events, time.time())
        stores.inventory.update_computer_states(ts, states)
    finally:
        event.remove(stores.database.engine, "before_cursor_execute", listener)
    assert len(outcome.recorded) == len(events)
    with stores.database.reading() as s:  # what the batches wrote
        assert (
            s.execute(text("SELECT count(*) FROM executions WHERE status = 'running'")).scalar()
            == 40
        )
        assert (
            s.execute(
                text("SELECT count(*) FROM computers WHERE tickle_state = 'unreachable'")
            ).scalar()
            == 40
        )
    # the computers of the states are looked up by name: with a few thousand of them a scan
    # may cost less than the index, and that is the planner's call
    scans = [
        s
        for s in _scans(stores, seen, {"executions", "computers"})
        if "Seq Scan on executions" in s or "SELECT computers." not in s
    ]
    assert not scans, "\n".join(scans)


def test_a_work_pull_reads_the_unfinished_executions_by_index_not_the_history(
    stores: Stores,
) -> None:
    # `status NOT IN (final)` could only filter what the computers' index gave: every execution
    # each client ever had (a pull cost more with every run)
    ts = fleet(stores, COMPUTERS)
    task = stores.catalog.create_task(m.TaskCreate(name="t", command=["true"]))
    for _ in range(3):  # a history: three runs on the whole fleet, finished
        stores.delivery.create_run(m.RunCreate(task_id=task.id, all_computers=True))
    with stores.database.writing() as s:
        s.execute(text("UPDATE executions SET status = 'succeeded'"))
    run = stores.delivery.create_run(m.RunCreate(task_id=task.id, computers=["c1", "c2"]))
    with stores.database.engine.connect() as conn:  # as autovacuum does after such a change
        conn.exec_driver_sql("ANALYZE")
        conn.commit()
    seen, listener = _statements(stores)
    try:
        work = stores.delivery.pull_work(ts, time.time(), "check")
    finally:
        event.remove(stores.database.engine, "before_cursor_execute", listener)
    assert sorted(w.execution_id for w in work.executions) == [e.id for e in run.executions]
    reads = [(s, p) for s, p in seen if s.startswith("SELECT") and "JOIN computers" in s]
    assert len(reads) == 1
    assert not _scans(stores, reads, {"executions"})
    with stores.database.engine.connect() as conn:
        plan = "\n".join(conn.exec_driver_sql("EXPLAIN " + reads[0][0], reads[0][1]).scalars())
        conn.rollback()
    assert "ix_executions_computer_status" in plan or "ix_executions_status_tickle" in plan, plan
