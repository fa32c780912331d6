"""SQLite's driver running the Core statements a run-now waits for (`tickle.ns.driver`): the same
rows as Core for the same parameters, one transaction that stays whole or not at all, errors as
SQLAlchemy raises them, and the engine's events seeing every statement and commit."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from sqlalchemy import bindparam, event, insert, or_, select
from sqlalchemy.exc import IntegrityError, OperationalError

from tests.ns.test_delivery_store import stores, task_server
from tickle import messages as m
from tickle.ns.database import retry_on_conflict
from tickle.ns.driver import Driver, DriverSql
from tickle.ns.models import Computer, Task
from tickle.ns.stores import Stores

__all__ = ["stores"]  # the fixture

_NAMED_OR_TS = (
    select(Computer.id, Computer.name)
    .where(
        or_(
            Computer.name.in_(bindparam("names", expanding=True)),
            Computer.task_server_id == bindparam("ts"),
        ),
        Computer.name.in_(["pc1", "pc2", "pc3"]),  # a constant list
        Computer.id >= bindparam("ts"),  # a name used twice
    )
    .order_by(Computer.id)
)


def test_a_statement_reads_what_core_reads_with_the_same_parameters(stores: Stores) -> None:
    with stores.database.writing_core() as conn:
        for name in ("pc1", "pc2", "pc3", "pc4"):
            conn.execute(
                insert(Computer).values(name=name, token_sha256=f"t-{name}", tickle_key="k")
            )
    statement = DriverSql(_NAMED_OR_TS)
    assert "'pc1', 'pc2', 'pc3'" in statement.sql  # the constant list in the SQL
    for params in (
        {"names": ["pc2"], "ts": 1},
        {"names": ["pc1", "pc3", "pc4"], "ts": 1},
        {"names": ["nobody"], "ts": 2},
    ):
        with stores.database.writing_core() as conn:
            core = [tuple(row) for row in conn.execute(_NAMED_OR_TS, params)]
        with stores.database.writing_driver() as driver:
            assert statement.execute(driver, params).fetchall() == core
        assert core or params["names"] == ["nobody"]


def _tasks(stores: Stores) -> list[str]:
    with stores.database.reading() as s:
        return list(s.scalars(select(Task.name).order_by(Task.name)))


def test_a_transaction_stays_whole_or_not_at_all(stores: Stores) -> None:
    add = DriverSql(insert(Task).values(name=bindparam("name"), timeout_s=1.0))
    with stores.database.writing_driver() as driver:
        add.execute(driver, {"name": "a"})
        add.execute(driver, {"name": "b"})

    def fail_half_way() -> None:
        with stores.database.writing_driver() as driver:
            add.execute(driver, {"name": "c"})
            raise RuntimeError("the caller failed half-way")

    with pytest.raises(RuntimeError):
        fail_half_way()
    assert _tasks(stores) == ["a", "b"]
    # the connection went back to the pool out of its transaction: the next one works
    with stores.database.writing_driver() as driver:
        add.execute(driver, {"name": "d"})
    assert _tasks(stores) == ["a", "b", "d"]


def test_a_driver_error_is_raised_as_sqlalchemy_raises_it(stores: Stores) -> None:
    add = DriverSql(insert(Task).values(name=bindparam("name"), timeout_s=1.0))
    with stores.database.writing_driver() as driver:
        add.execute(driver, {"name": "a"})
    tries: list[int] = []

    def add_again() -> None:
        tries.append(1)
        with stores.database.writing_driver() as driver:
            add.execute(driver, {"name": "a"})  # the name is unique

    with pytest.raises(IntegrityError) as raised:
        retry_on_conflict(add_again)
    assert isinstance(raised.value.orig, sqlite3.IntegrityError)
    assert len(tries) == 3  # retried as a lost insert race is
    assert _tasks(stores) == ["a"]


def test_the_engine_s_events_see_each_statement_and_commit(stores: Stores) -> None:
    """As SQLAlchemy calls them: a listener may fail a statement (the fault tests do) or change
    it (retval=True)."""
    engine = stores.database.engine
    seen: list[tuple[str, Any]] = []

    def executed(conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        assert statement.endswith("-- traced")  # as a listener with retval=True changed it
        seen.append((statement.split()[0], params))

    def commented(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> Any:
        return statement + " -- traced", params

    def committed(conn: Any) -> None:
        seen.append(("COMMIT", isinstance(conn, Driver)))

    def refuse(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "refused" in params:
            raise OperationalError(statement, None, Exception("the database is away"))

    add = DriverSql(insert(Task).values(name=bindparam("name"), timeout_s=1.0))
    event.listen(engine, "after_cursor_execute", executed)
    event.listen(engine, "commit", committed)
    event.listen(engine, "before_cursor_execute", refuse)
    event.listen(engine, "before_cursor_execute", commented, retval=True)
    try:
        with stores.database.writing_driver() as driver:
            add.execute(driver, {"name": "a"})
            driver.executemany("UPDATE tasks SET timeout_s = ? WHERE name = ?", [(2.0, "a")])
        with pytest.raises(OperationalError), stores.database.writing_driver() as driver:
            add.execute(driver, {"name": "refused"})  # failed by a listener, as fault tests do
    finally:
        event.remove(engine, "after_cursor_execute", executed)
        event.remove(engine, "commit", committed)
        event.remove(engine, "before_cursor_execute", refuse)
        event.remove(engine, "before_cursor_execute", commented)
    assert seen == [("INSERT", ["a", 1.0]), ("UPDATE", [(2.0, "a")]), ("COMMIT", True)]
    assert _tasks(stores) == ["a"]


def test_a_run_now_and_its_pull_by_the_driver_are_what_the_api_reads_back(
    stores: Stores,
) -> None:
    ts = task_server(stores)
    stores.inventory.register_agent(ts, m.AgentRegistration(name="pc1", groups=["g"]))
    t1 = stores.catalog.create_task(m.TaskCreate(name="t1", command=["echo", "hi"]))
    t2 = stores.catalog.create_task(m.TaskCreate(name="t2", script="exit 0", timeout_s=5))
    job = stores.catalog.create_job(m.JobCreate(name="j", task_ids=[t2.id, t1.id, t2.id]))
    audited: list[str] = []
    run = stores.delivery.create_run(
        m.RunCreate(job_id=job.id, groups=["g"]),
        lambda conn, run: audited.append(type(conn).__name__),
    )
    assert audited == ["Driver"]
    assert run == stores.delivery.run(run.id)
    work = stores.delivery.pull_work(ts, run.created_at + 1, "tickle", run.created_at)
    (execution,) = work.executions
    assert [s.name for s in execution.steps] == ["t2", "t1", "t2"]
    assert execution.steps[1].command == ["echo", "hi"]
    assert execution.steps[0].timeout_s == 5
    at = {s.step: s.at for s in stores.delivery.execution(run.executions[0].id).timeline}
    assert at["ts_pulled"] == run.created_at + 1
    assert at["tickle_sent"] == run.created_at
