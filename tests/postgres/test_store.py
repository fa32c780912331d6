"""The NS stores on PostgreSQL with several processes' stores on one database (in one test process,
each process's Stores with its own engine and connections, as separate NS processes have)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import psycopg
import pytest
from sqlalchemy import event

from tests.ns.test_delivery_store import (
    check_a_batch_records_each_event_once_and_only_from_its_task_server,
    check_a_step_reported_again_keeps_its_last_output,
    check_an_event_read_by_the_fast_path_is_recorded_as_the_routes_one,
    check_run_now_answers_the_run_as_read_back,
)
from tests.ns.test_inventory_store import (
    check_computer_states_apply_each_column_and_name_the_unknown,
)
from tests.reliability import record
from tickle import messages as m
from tickle.ns.credentials import Caller, token_sha256
from tickle.ns.stores import Stores
from tickle.ns.stores.inventory import Enrolled, Enrollment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]
_A = TypeVar("_A")
_B = TypeVar("_B")


@pytest.fixture
def stores(pg_url: str) -> Iterator[tuple[Stores, Stores]]:
    """Two processes' stores (two NS processes' worth of connections) on one migrated database."""
    a, b = Stores.open(pg_url), Stores.open(pg_url)
    try:
        a.database.migrate()
        b.database.migrate()  # a second migration at start is a no-op
        yield a, b
    finally:
        a.close()
        b.close()


def test_released_dispatcher_lock_is_free_for_another_process_at_once(
    stores: tuple[Stores, Stores],
) -> None:
    a, b = stores
    lock_a, lock_b = a.database.dispatcher_lock(), b.database.dispatcher_lock()
    try:
        assert lock_a.try_acquire()
        assert not lock_b.try_acquire()
        lock_a.release()  # a's process goes on (its engine and pool stay): the lock must be free
        assert lock_b.try_acquire()
        assert not lock_a.try_acquire()
    finally:
        lock_a.release()
        lock_b.release()


def test_a_released_lock_is_free_before_the_server_sees_its_session_end(
    stores: tuple[Stores, Stores], monkeypatch: pytest.MonkeyPatch
) -> None:
    # released by ending its session alone, the lock stayed held until the server noticed the
    # connection go: the other process, trying right after, failed now and then (one clean-clone
    # CI run in a few). Here the session's end never reaches the server (invalidate does
    # nothing, close hands the session back to the pool): only an explicit unlock frees it.
    a, b = stores
    lock_a, lock_b = a.database.dispatcher_lock(), b.database.dispatcher_lock()
    try:
        assert lock_a.try_acquire()
        held = lock_a._conn
        assert held is not None
        monkeypatch.setattr(held, "invalidate", lambda *args, **kwargs: None)
        lock_a.release()
        assert lock_b.try_acquire(), "still held after its release"
    finally:
        lock_a.release()
        lock_b.release()


def _ts_registration(name: str) -> m.TaskServerRegister:
    return m.TaskServerRegister(
        enrollment_secret="x" * 16, name=name, tickle_host="127.0.0.1", tickle_port=9,
        api_url="http://127.0.0.1:9",
    )  # fmt: skip


def _one_execution(stores: Stores) -> tuple[Caller, int]:
    """A task server with one client and one pulled execution; returns the caller and its id."""
    creds = stores.inventory.register_task_server(_ts_registration("ts1"), "ns")
    ts = stores.inventory.caller_for(token_sha256(creds.token))
    assert ts is not None
    stores.inventory.register_agent(ts, m.AgentRegistration(name="c1", tickle_host="127.0.0.1"))
    task = stores.catalog.create_task(m.TaskCreate(name="t", command=["true"]))
    stores.delivery.create_run(m.RunCreate(task_id=task.id, computers=["c1"]))
    (work,) = stores.delivery.pull_work(ts, time.time(), "tickle").executions
    return ts, work.execution_id


def _event(execution_id: int, kind: str, **fields: Any) -> m.StatusEvent:
    return m.StatusEvent(
        event_id=str(uuid.uuid4()), execution_id=execution_id, computer="c1", kind=kind,
        at=time.time(), **fields,
    )  # fmt: skip


def test_started_and_finished_recorded_at_once_by_two_processes_leave_the_execution_finished(
    stores: tuple[Stores, Stores],
) -> None:
    """Process A reads the execution for a `started` event; process B records `finished` before
    A writes: A must not turn the finished execution back to running."""
    a, b = stores
    ts, execution_id = _one_execution(a)
    a.delivery.record_events(ts, [_event(execution_id, "agent_pulled", via="tickle")], time.time())
    a_read, b_done = threading.Event(), threading.Event()

    def pause_after_reading_the_execution(
        _conn: object, _cursor: object, statement: str, *_args: object
    ) -> None:
        if "FROM executions" in statement and not a_read.is_set():
            a_read.set()
            # B commits its finish meanwhile, unless A's read locked the row (then B waits for A)
            b_done.wait(1.5)

    event.listen(a.database.engine, "after_cursor_execute", pause_after_reading_the_execution)
    started = _event(execution_id, "started")
    finished = _event(execution_id, "finished", exit_code=0, status="succeeded")
    with ThreadPoolExecutor(2) as pool:
        in_a = pool.submit(a.delivery.record_events, ts, [started], time.time())
        assert a_read.wait(10), "process A never read the execution"
        in_b = pool.submit(b.delivery.record_events, ts, [finished], time.time())
        outcome_b = in_b.result(20)
        b_done.set()
        outcome_a = in_a.result(20)
    event.remove(a.database.engine, "after_cursor_execute", pause_after_reading_the_execution)

    assert outcome_a.accepted == [started.event_id]
    assert outcome_b.accepted == [finished.event_id]
    execution = b.delivery.execution(execution_id)
    assert execution.status == "succeeded", execution
    times = {step.step: step.at for step in execution.timeline}
    assert times["started"] is not None
    assert times["finished"] is not None


def test_a_tickle_caused_pull_is_seen_acknowledged_by_another_process_before_it_reads_the_work(
    stores: tuple[Stores, Stores],
) -> None:
    """The dispatcher (process B) resends a tickle the task server did not pull: a pull that
    process A is serving must show as the acknowledgement at once, not only when A commits the
    work it read (a long pull of thousands of executions outlasted the first resend's delay, and
    the resend brought a second pull of them all)."""
    a, b = stores
    ts, _ = _one_execution(a)
    a.delivery.create_run(m.RunCreate(task_id=1, computers=["c1"]))
    reading, seen, pause = _pause_after_first_read(a, "executions", hold_s=5)
    asked = time.time()
    try:
        with ThreadPoolExecutor(1) as pool:
            pull = pool.submit(a.delivery.pull_work, ts, time.time(), "tickle")
            assert reading.wait(10), "process A never read the work"
            try:
                work_pulled, _ = b.inventory.pulls_caused("ts1")
            finally:
                seen.set()
            assert len(pull.result(20).executions) == 2
    finally:
        event.remove(a.database.engine, "after_cursor_execute", pause)
    assert work_pulled is not None
    assert work_pulled >= asked  # this pull's, not the one before


def test_settings_changed_at_once_by_two_processes_bump_the_version_twice(
    stores: tuple[Stores, Stores],
) -> None:
    """Two operators change different settings through two NS processes at once: both changes
    stay and the version moves twice, so a task server that saw the first change sees a new
    version for the second."""
    a, b = stores
    before = a.settings.settings().version
    a_read, b_done = threading.Event(), threading.Event()

    def pause_after_reading_the_settings(
        _conn: object, _cursor: object, statement: str, *_args: object
    ) -> None:
        if "FROM settings" in statement and not a_read.is_set():
            a_read.set()
            b_done.wait(1.5)  # B commits meanwhile, unless A's read locked the row

    event.listen(a.database.engine, "after_cursor_execute", pause_after_reading_the_settings)
    with ThreadPoolExecutor(2) as pool:
        in_a = pool.submit(
            a.settings.update_settings, m.SettingsUpdate(task_request_interval_s=100)
        )
        assert a_read.wait(10), "process A never read the settings"
        in_b = pool.submit(b.settings.update_settings, m.SettingsUpdate(poll_jitter_fraction=0.25))
        in_b.result(20)
        b_done.set()
        in_a.result(20)
    event.remove(a.database.engine, "after_cursor_execute", pause_after_reading_the_settings)

    after = b.settings.settings()
    assert after.version == before + 2, after
    assert after.task_request_interval_s == 100
    assert after.poll_jitter_fraction == 0.25


def _pause_after_first_read(
    stores: Stores, table: str, hold_s: float = 1.5
) -> tuple[threading.Event, threading.Event, Any]:
    """Hold `stores`'s first read of `table` until told (or `hold_s`): the other process acts."""
    read, other_done = threading.Event(), threading.Event()

    def pause(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if f"FROM {table}" in statement and not read.is_set():
            read.set()
            other_done.wait(hold_s)

    event.listen(stores.database.engine, "after_cursor_execute", pause)
    return read, other_done, pause


def test_same_new_agent_registered_at_once_by_two_processes_gets_credentials_from_both(
    stores: tuple[Stores, Stores],
) -> None:
    """An agent's registration reaches two NS processes at once (a task server retrying through
    a load balancer): both read "no such computer", both insert; the later one must not fail
    (it was a 500) but take the update path. One computer, and the last credentials hold."""
    a, b = stores
    creds = a.inventory.register_task_server(_ts_registration("ts1"), "ns")
    ts = a.inventory.caller_for(token_sha256(creds.token))
    assert ts is not None
    reg = m.AgentRegistration(name="laptop-1", tickle_host="127.0.0.1")
    a_read, b_done, pause = _pause_after_first_read(a, "computers")
    with ThreadPoolExecutor(2) as pool:
        in_a = pool.submit(a.inventory.register_agent, ts, reg)
        assert a_read.wait(10), "process A never looked the computer up"
        from_b = pool.submit(b.inventory.register_agent, ts, reg).result(20)
        b_done.set()
        from_a = in_a.result(20)
    event.remove(a.database.engine, "after_cursor_execute", pause)

    assert [c.name for c in b.inventory.computers()].count("laptop-1") == 1
    # A committed last: its token is the one
    holder = b.inventory.caller_for(token_sha256(from_a.token))
    assert holder is not None
    assert holder.name == "laptop-1"
    assert b.inventory.caller_for(token_sha256(from_b.token)) is None


def test_a_group_of_registrations_that_lost_an_insert_race_is_written_again_whole(
    stores: tuple[Stores, Stores],
) -> None:
    """Registrations written together (one transaction) while another NS process registers one
    of their names: the group's insert of that name fails, the whole group is written again,
    and every registration in it is answered; one computer a name."""
    a, b = stores
    creds = a.inventory.register_task_server(_ts_registration("ts1"), "ns")
    ts = a.inventory.caller_for(token_sha256(creds.token))
    assert ts is not None
    group = [Enrollment(ts, m.AgentRegistration(name=name, tickle_host="127.0.0.1"))
             for name in ("laptop-1", "laptop-2")]  # fmt: skip
    lost: list[str] = []  # the insert races A lost (each makes it write the group again)
    event.listen(a.database.engine, "handle_error",
                 lambda ctx: lost.append(type(ctx.original_exception).__name__))  # fmt: skip
    a_read, b_done, pause = _pause_after_first_read(a, "computers")
    with ThreadPoolExecutor(2) as pool:
        in_a = pool.submit(a.inventory.enroll_agents, group)
        assert a_read.wait(10), "process A never looked laptop-1 up"
        b.inventory.register_agent(ts, group[0].registration)
        b_done.set()
        from_a = in_a.result(20)
    event.remove(a.database.engine, "after_cursor_execute", pause)

    assert lost == ["UniqueViolation"]
    assert all(isinstance(outcome, Enrolled) for outcome in from_a)
    names = [c.name for c in b.inventory.computers()]
    assert sorted(names) == ["laptop-1", "laptop-2"]
    for outcome in from_a:  # A committed last: its tokens are the ones
        assert isinstance(outcome, Enrolled)
        holder = b.inventory.caller_for(token_sha256(outcome.credentials.token))
        assert holder is not None
        assert holder.name == outcome.credentials.name


def test_same_new_task_server_registered_at_once_by_two_processes_gets_credentials_from_both(
    stores: tuple[Stores, Stores],
) -> None:
    a, b = stores
    reg = _ts_registration("ts-new")
    a_read, b_done, pause = _pause_after_first_read(a, "task_servers")
    with ThreadPoolExecutor(2) as pool:
        in_a = pool.submit(a.inventory.register_task_server, reg, "ns")
        assert a_read.wait(10), "process A never looked the task server up"
        from_b = pool.submit(b.inventory.register_task_server, reg, "ns").result(20)
        b_done.set()
        from_a = in_a.result(20)
    event.remove(a.database.engine, "after_cursor_execute", pause)

    assert [t.name for t in b.inventory.task_servers()].count("ts-new") == 1
    holder = b.inventory.caller_for(token_sha256(from_a.token))
    assert holder is not None
    assert holder.name == "ts-new"
    assert b.inventory.caller_for(token_sha256(from_b.token)) is None


def test_run_now_answers_the_run_as_read_back_on_postgresql(
    stores: tuple[Stores, Stores],
) -> None:
    # PostgreSQL's run now inserts its executions from an array of computers (`stores.bulk`)
    check_run_now_answers_the_run_as_read_back(stores[0])


def test_a_batch_records_each_event_once_and_only_from_its_task_server_on_postgresql(
    stores: tuple[Stores, Stores],
) -> None:
    # PostgreSQL inserts the batch's events in one statement that skips the ids recorded before
    check_a_batch_records_each_event_once_and_only_from_its_task_server(stores[0])


def test_an_event_read_by_the_fast_path_is_recorded_as_the_routes_one_on_postgresql(
    stores: tuple[Stores, Stores],
) -> None:
    # PostgreSQL writes the bodies inside the rows' JSON document, the output left out there
    check_an_event_read_by_the_fast_path_is_recorded_as_the_routes_one(stores[0])


def test_a_step_reported_again_keeps_its_last_output_on_postgresql(
    stores: tuple[Stores, Stores],
) -> None:
    check_a_step_reported_again_keeps_its_last_output(stores[0])


def test_computer_states_apply_each_column_and_name_the_unknown_on_postgresql(
    stores: tuple[Stores, Stores],
) -> None:
    # PostgreSQL reads the names from one array and updates from one JSON document (`bulk`)
    check_computer_states_apply_each_column_and_name_the_unknown(stores[0])


def test_a_pull_and_the_sweep_ending_its_executions_at_once_both_finish_without_a_deadlock(
    stores: tuple[Stores, Stores], pg_url: str
) -> None:
    """The sweeper (process B) ends executions it finds lost while a pull (process A) stamps the
    same ones: both must lock them in id order. The rows lie out of id order and a third
    connection holds the lower one, so the pull waits for it first; a sweep ending them in the
    order its query found them takes the higher one first and the two deadlock."""
    a, b = stores
    ts, low, high = _run_on_two_computers(a)
    later = time.time() + 10 * 86400  # the sweep's clock: long after, both computers silent
    work, ended = _pull_first_then(
        pg_url, low, lambda: a.delivery.pull_work(ts, time.time(), "tickle"),
        lambda: b.cancel.sweep(later, 1.0, 0.0),
        "PostgreSQL: a pull and the sweep ending its executions at once (2 NS processes)",
        "rows out of id order, the pull waiting first for a row the sweep needs",
    )  # fmt: skip

    assert sorted(e.execution_id for e in work.executions) == [low, high]
    assert sorted(ended.lost) == [low, high]


def _run_on_two_computers(store: Stores) -> tuple[Caller, int, int]:
    """A task server with agents c1 and c2 and a run on both: the task server, the two
    execution ids (lower first)."""
    creds = store.inventory.register_task_server(_ts_registration("ts1"), "ns")
    ts = store.inventory.caller_for(token_sha256(creds.token))
    assert ts is not None
    for name in ("c1", "c2"):
        store.inventory.register_agent(ts, m.AgentRegistration(name=name, tickle_host="127.0.0.1"))
    task = store.catalog.create_task(m.TaskCreate(name="t", command=["true"]))
    run = store.delivery.create_run(m.RunCreate(task_id=task.id, computers=["c2", "c1"]))
    low, high = sorted(e.id for e in run.executions)
    return ts, low, high


def _pull_first_then(
    pg_url: str, low: int, pull: Callable[[], _A], other: Callable[[], _B], case: str, done: str
) -> tuple[_A, _B]:
    """Run `pull` and then `other` on executions lying out of id order (the lower id's row
    rewritten, so its new version lies after the higher one's), with a third connection holding
    the lower one until both wait: the pull waits for it first, and `other` deadlocks with it
    unless it too locks the rows in id order. Records the outcome; returns both answers."""
    with psycopg.connect(_libpq_url(pg_url)) as holder:
        holder.execute("UPDATE executions SET job_id = NULL WHERE id = %s", (low,))
        holder.commit()
        holder.execute("SELECT id FROM executions WHERE id = %s FOR UPDATE", (low,))
        with ThreadPoolExecutor(2) as pool:
            pulled = pool.submit(pull)
            _wait_for_lock_waiters(pg_url, 1)
            then = pool.submit(other)
            _wait_for_lock_waiters(pg_url, 2)
            holder.commit()  # the pull goes first, then the other
            errors = [f.exception(20) for f in (pulled, then)]
            failed = [type(e).__name__ for e in errors if e]
            outcome = f"failed: {failed}" if failed else "both committed, no deadlock"
            record(case=case, done=done, outcome=outcome, tried=1)
            return pulled.result(), then.result()


def _backends_waiting_for_a_lock(pg_url: str) -> int:
    with psycopg.connect(_libpq_url(pg_url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def _libpq_url(pg_url: str) -> str:
    return pg_url.replace("postgresql+psycopg://", "postgresql://", 1)


def _wait_for_lock_waiters(pg_url: str, count: int) -> None:
    end = time.monotonic() + 10
    while _backends_waiting_for_a_lock(pg_url) < count:
        assert time.monotonic() < end, f"never {count} backend(s) waiting for a lock"
        time.sleep(0.02)


def test_a_pull_and_the_stamp_of_its_tickle_at_once_both_succeed_whatever_order_the_rows_lie_in(
    stores: tuple[Stores, Stores], pg_url: str
) -> None:
    """The dispatcher stamps `tickle_sent_at` on a task server's work (process B) while the pull
    that tickle caused stamps `ts_pulled_at` on the same executions (process A). Both must lock
    the rows in one order: a pull that lost a deadlock answered 500 after the dispatcher had
    taken it as the tickle's acknowledgement, and the task server's work waited for its
    periodic check (S3 stalled ~50 s).

    The executions lie out of id order (the lower id rewritten since, as any update does) and a
    third connection holds the lower one, so the pull waits for it first and the stamp, coming
    second, reaches the rows in the order they lie in unless it locks them in id order too."""
    a, b = stores
    ts, low, high = _run_on_two_computers(a)
    sent_at = time.time()
    work, count = _pull_first_then(
        pg_url, low, lambda: a.delivery.pull_work(ts, time.time(), "tickle"),
        lambda: b.delivery.mark_tickle_sent("ts1", sent_at),
        "PostgreSQL: a pull and the stamp of its tickle at once (2 NS processes)",
        "rows out of id order, the pull waiting first for a row the stamp needs",
    )  # fmt: skip

    assert sorted(e.execution_id for e in work.executions) == [low, high]
    assert count == 2
    with psycopg.connect(_libpq_url(pg_url)) as conn:
        rows = conn.execute(
            "SELECT tickle_sent_at, ts_pulled_at FROM executions ORDER BY id"
        ).fetchall()
    assert [r[0] for r in rows] == [pytest.approx(sent_at)] * 2
    assert all(r[1] is not None for r in rows)
