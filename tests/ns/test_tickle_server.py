"""The NS tickle server against a task server played by the test over HTTP and real UDP."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from tests.ns.conftest import FakeTaskServer, Ns, NsFactory, commits_of, wait_for
from tests.reliability import record
from tickle import wire
from tickle.messages import RunCreate, SettingsUpdate
from tickle.ns.credentials import token_sha256
from tickle.ns.stores import Stores
from tickle.ns.tickle_server import STAMP_WAIT_S


async def test_run_now_tickles_the_task_server_and_its_pull_acks_it(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    before = time.time()
    run = await ns.run_task(["pc1"])

    tickle, _ = await ts.tickle(within=2.0)
    assert tickle.kind is wire.Kind.TASKS
    assert tickle.sender == ns.settings.ns_id
    work = await ts.ok("GET", "/api/ts/work?via=tickle")
    assert [w["execution_id"] for w in work["executions"]] == [run["executions"][0]["id"]]
    assert work["executions"][0]["steps"][0]["command"] == ["true"]

    # the pull acknowledged the tickle: nothing more arrives over several backoff periods
    await ts.no_tickle(within=4 * ns.settings.tickle_backoff_max_s)
    execution = await ns.ok("GET", f"/api/executions/{run['executions'][0]['id']}")
    times = {step["step"]: step["at"] for step in execution["timeline"]}
    assert before <= times["tickle_sent"] <= times["ts_pulled"]
    servers = await ns.ok("GET", "/api/task-servers")
    assert servers[0]["tickle_state"] == "reachable"
    assert servers[0]["last_pull_at"] >= times["ts_pulled"]


async def test_the_pull_a_tickle_causes_stamps_its_tickle_sent_in_the_pulls_own_commit(
    ns: Ns,
) -> None:
    # a write of its own just after the send made the pull wait for SQLite's write lock
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    with commits_of(ns.stores.database.engine) as commits:
        run = await ns.run_task(["pc1"])
        await ts.tickle(within=2.0)
        await ts.ok("GET", "/api/ts/work?via=tickle")
    stamps = [c for c in commits if any("SET tickle_sent_at" in s for s in c)]
    assert len(stamps) == 1
    assert any("tickle_pulled_at=" in s for s in stamps[0])  # the pull's
    assert ns.tickle_server.unstamped("ts1") is None  # nothing left to write later
    execution = await ns.ok("GET", f"/api/executions/{run['executions'][0]['id']}")
    times = {step["step"]: step["at"] for step in execution["timeline"]}
    assert run["created_at"] <= times["tickle_sent"] <= times["ts_pulled"]


async def test_a_tickle_whose_pull_does_not_come_is_stamped_by_the_tickle_server(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    run = await ns.run_task(["pc1"])
    await ts.tickle(within=2.0)
    received_at = time.time()

    async def tickle_sent() -> float | None:
        execution = await ns.ok("GET", f"/api/executions/{run['executions'][0]['id']}")
        return {step["step"]: step["at"] for step in execution["timeline"]}["tickle_sent"]

    sent = await wait_for(tickle_sent, within=STAMP_WAIT_S + 5)
    assert run["created_at"] <= sent <= received_at


async def test_run_now_tickles_a_known_task_server_at_once_without_a_dispatch_pass(
    ns: Ns, monkeypatch: pytest.MonkeyPatch
) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    await ns.tickle_server.dispatch_once()  # the task server is known (its link is read)
    stuck = asyncio.Event()

    async def no_pass(taking_over: bool = False) -> None:
        await stuck.wait()  # the dispatch loop's passes never end from now on

    monkeypatch.setattr(ns.tickle_server, "dispatch_once", no_pass)
    try:
        run = await ns.run_task(["pc1"])
        tickle, _ = await ts.tickle(within=2.0)
        assert tickle.kind is wire.Kind.TASKS
        work = await ts.ok("GET", "/api/ts/work?via=tickle")
        assert [w["execution_id"] for w in work["executions"]] == [run["executions"][0]["id"]]
        await ts.no_tickle(within=4 * ns.settings.tickle_backoff_max_s)  # the pull acked it
    finally:
        stuck.set()


async def test_a_dispatcher_taking_over_tickles_for_work_pulled_but_still_pending(ns: Ns) -> None:
    """An NS killed while it answered a work pull had committed `ts_pulled_at`, but its answer may
    never have reached the task server, which then waits out its retry schedule (seconds after
    an NS restart: S6 of issue 10). The process that dispatches next (the restarted one, or a
    PostgreSQL standby taking over) tickles for every execution still pending, pulled or not;
    a task server that has it already finds nothing new in its pull."""
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    run = await ns.run_task(["pc1"])
    await ts.tickle(within=2.0)
    await ts.ok("GET", "/api/ts/work?via=tickle")  # pulled: the answer lost on its way
    await ts.no_tickle(within=2 * ns.settings.tickle_backoff_max_s)  # acknowledged

    await ns.tickle_server.dispatch_once(taking_over=True)
    tickle, _ = await ts.tickle(within=2.0)
    assert tickle.kind is wire.Kind.TASKS
    work = await ts.ok("GET", "/api/ts/work?via=tickle")
    assert [w["execution_id"] for w in work["executions"]] == [run["executions"][0]["id"]]
    # a pass of the dispatcher that did not just take over leaves pulled work alone
    await ns.tickle_server.dispatch_once()
    await ts.no_tickle(within=2 * ns.settings.tickle_backoff_max_s)


async def test_tickle_in_flight_follows_its_task_server_to_a_new_address(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    await ns.run_task(["pc1"])
    await ts.tickle(within=2.0)  # not pulled: resent until it is
    moved = FakeTaskServer(ns, "ts1")
    await moved.start()  # re-registers: the same name at another port
    try:
        tickle, _ = await moved.tickle(within=4 * ns.settings.tickle_backoff_max_s)
        assert tickle.kind is wire.Kind.TASKS
    finally:
        moved.close()


async def test_acknowledged_tickles_write_the_reachable_state_once_not_per_run(
    ns_factory: NsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each run's tickle-caused pull must come before the tickler gives up (tries x backoff)
    ns = await ns_factory(tickle_tries=2, tickle_backoff_s=0.5, tickle_backoff_max_s=0.5)
    written: list[str] = []
    write = ns.stores.inventory.set_task_server_state

    def counted(name: str, state: str) -> None:
        written.append(state)
        write(name, state)

    monkeypatch.setattr(ns.stores.inventory, "set_task_server_state", counted)
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    for i in range(3):
        await _run_and_pull(ns, ts, f"run{i}")
    assert written == ["reachable"]
    # unanswered: unreachable; answered again: reachable again
    await ns.run_task(["pc1"], name="unanswered")
    for _ in range(2):
        await ts.tickle(within=2.0)
    await wait_for(lambda: _state_is(ns, "unreachable"), within=10.0)
    await ts.ok("GET", "/api/ts/work?via=check")  # not an ack
    await _run_and_pull(ns, ts, "answered")
    assert written == ["reachable", "unreachable", "reachable"]


async def test_a_dispatch_pass_reading_during_a_state_write_does_not_hide_the_next_change(
    ns_factory: NsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the unreachable state is still being written when a dispatch pass reads the task servers:
    # what it read (reachable) must not replace what the tickle server knows, or the ack that
    # follows (before the next pass) finds "reachable" already and never writes it
    ns = await ns_factory(
        tickle_tries=2, tickle_backoff_s=1.0, tickle_backoff_max_s=1.0, dispatch_poll_s=60.0
    )
    entered, release = threading.Event(), threading.Event()
    write = ns.stores.inventory.set_task_server_state

    def slow(name: str, state: str) -> None:
        if state == "unreachable":
            entered.set()
            assert release.wait(10.0), "the test never released the write"
        write(name, state)

    monkeypatch.setattr(ns.stores.inventory, "set_task_server_state", slow)
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    await _run_and_pull(ns, ts, "answered-first")
    await ns.run_task(["pc1"], name="unanswered")
    for _ in range(2):
        await ts.tickle(within=3.0)
    assert await asyncio.to_thread(entered.wait, 5.0), "the unreachable state was never written"
    await ns.tickle_server.dispatch_once()  # reads "reachable": the write is not committed
    release.set()
    await wait_for(lambda: _state_is(ns, "unreachable"), within=10.0)
    await ts.ok("GET", "/api/ts/work?via=check")  # the unanswered run's work: not an ack
    await _run_and_pull(ns, ts, "answered-again")  # tickled at once by the run, not by a pass


async def _run_and_pull(ns: Ns, ts: FakeTaskServer, name: str) -> None:
    """A run on pc1 whose tickle the task server answers: it ends tickle-reachable."""
    await ns.run_task(["pc1"], name=name)
    await ts.tickle(within=2.0)
    await ts.ok("GET", "/api/ts/work?via=tickle")
    await wait_for(lambda: _state_is(ns, "reachable"), within=10.0)


async def _state_is(ns: Ns, wanted: str) -> bool:
    return bool((await ns.ok("GET", "/api/task-servers"))[0]["tickle_state"] == wanted)


async def test_unpulled_tickle_is_resent_with_backoff_then_task_server_is_unreachable(
    ns_factory: NsFactory,
) -> None:
    ns = await ns_factory(tickle_tries=3, tickle_backoff_s=0.2, tickle_backoff_max_s=0.4)
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    await ns.run_task(["pc1"])

    sends = [await ts.tickle(within=2.0) for _ in range(3)]
    assert all(t.kind is wire.Kind.TASKS for t, _ in sends)
    seqs = [t.seq for t, _ in sends]
    assert seqs == sorted(set(seqs)), "each resend is a new datagram with a higher sequence"
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(sends)]
    # 0.2 s then 0.4 s, each +/- 10% jitter
    assert gaps[0] >= 0.15, gaps
    assert gaps[1] >= 0.3, gaps

    async def unreachable() -> bool:
        servers = await ns.ok("GET", "/api/task-servers")
        return bool(servers[0]["tickle_state"] == "unreachable")

    await wait_for(unreachable, within=3.0)
    await ts.no_tickle(within=0.8)  # bounded: no fourth try
    assert ns.metrics.tickles_unreachable._value.get() == 1


async def test_settings_change_bumps_version_and_settings_pull_acks_the_settings_tickle(
    ns: Ns,
) -> None:
    ts = await ns.task_server("ts1")
    before = await ns.ok("GET", "/api/settings")
    out = await ns.ok("PUT", "/api/settings", json={"task_request_interval_s": 120})
    assert out["version"] == before["version"] + 1
    assert out["task_request_interval_s"] == 120

    tickle, _ = await ts.tickle(within=2.0)
    assert tickle.kind is wire.Kind.SETTINGS
    pulled = await ts.ok("GET", "/api/ts/settings?via=tickle")
    assert pulled == out
    await ts.no_tickle(within=4 * ns.settings.tickle_backoff_max_s)


@pytest.mark.attacks
async def test_settings_update_that_changes_nothing_keeps_the_version_and_tickles_no_one(
    ns: Ns,
) -> None:
    ts = await ns.task_server("ts1")
    before = await ns.ok("GET", "/api/settings")
    same = {k: before[k] for k in ("task_request_interval_s", "poll_jitter_fraction")}
    bodies = [{}, same, {**same, "ts_check_interval_s": None}]
    answers = [await ns.ok("PUT", "/api/settings", json=body) for body in bodies]
    versions = [a["version"] for a in answers]
    tickled = False
    try:
        await ts.no_tickle(within=1.0)
    except AssertionError:
        tickled = True
    record(
        case="Settings update that changes nothing",
        done="PUT /api/settings with an empty body, with the current values, with nulls",
        outcome="version kept, no settings tickle"
        if versions == [before["version"]] * 3 and not tickled
        else f"versions {versions}, tickled {tickled}",
        tried=3,
    )
    assert answers == [before] * 3
    assert not tickled, "an update that changes nothing sent a settings tickle"
    # a real change still bumps and tickles
    out = await ns.ok("PUT", "/api/settings", json={"poll_jitter_fraction": 0.2})
    assert out["version"] == before["version"] + 1
    assert (await ts.tickle(within=2.0))[0].kind is wire.Kind.SETTINGS


async def test_every_task_server_gets_the_settings_tickle(ns: Ns) -> None:
    ts1, ts2 = await ns.task_server("ts1"), await ns.task_server("ts2")
    await ns.ok("PUT", "/api/settings", json={"poll_jitter_fraction": 0.2})
    for ts in (ts1, ts2):
        tickle, _ = await ts.tickle(within=2.0)
        assert tickle.kind is wire.Kind.SETTINGS
        await ts.ok("GET", "/api/ts/settings")


async def test_a_task_server_read_before_it_registered_still_gets_the_settings_tickle(
    ns: Ns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a pass read the links before ts2's registration committed, and the settings version after
    # a change committed: it tickled ts1 alone and counted the version as sent
    ts1, ts2 = await ns.task_server("ts1"), await ns.task_server("ts2")
    inventory = ns.stores.inventory
    read = inventory.task_server_links
    armed = threading.Event()

    def links_then_a_settings_change() -> list[Any]:
        links = read()
        if armed.is_set():
            armed.clear()
            links = [link for link in links if link.name != "ts2"]  # as if not committed yet
            ns.stores.settings.update_settings(SettingsUpdate(poll_jitter_fraction=0.2))
        return links

    monkeypatch.setattr(inventory, "task_server_links", links_then_a_settings_change)
    armed.set()
    ns.tickle_server.notify()
    for ts in (ts1, ts2):
        tickle, _ = await ts.tickle(within=2.0)
        assert tickle.kind is wire.Kind.SETTINGS
    assert not armed.is_set()


async def _tickled_then_pulled_by_another_process(ns: Ns) -> FakeTaskServer:
    """A task server tickled for a run-now, whose pull another NS API process sharing the
    database serves: only the database knows of it."""
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    await ns.run_task(["pc1"])
    await ts.tickle(within=2.0)
    other = Stores.open(ns.settings.db_url)
    try:
        caller = other.inventory.caller_for(token_sha256(ts.token))
        assert caller is not None
        other.delivery.pull_work(caller, time.time(), "tickle")
    finally:
        other.close()
    return ts


async def test_pull_served_by_another_process_acks_the_tickle(ns_factory: NsFactory) -> None:
    # its first resend due 3 s after the tickle: the other process's pull commits before it even
    # on a loaded machine (with the usual 0.2 s a resend could go before that pull, rightly)
    ns = await ns_factory(tickle_backoff_s=3.0, tickle_backoff_max_s=3.0)
    ts = await _tickled_then_pulled_by_another_process(ns)
    await ts.no_tickle(within=1.5 * ns.settings.tickle_backoff_max_s)  # past the first resend


async def test_a_pull_served_by_another_process_stops_the_resend_before_the_next_db_poll(
    ns_factory: NsFactory,
) -> None:
    # the resend is due long before the dispatcher's next look at the database: it looks for
    # that task server's pull first (a second tickle brought a second pull of all its work,
    # 2,500 executions read, sent and compared again in issue 10's S3)
    ns = await ns_factory(
        tickle_backoff_s=0.5, tickle_backoff_max_s=0.5, tickle_tries=6, dispatch_poll_s=60.0
    )
    ts = await _tickled_then_pulled_by_another_process(ns)
    await ts.no_tickle(within=2.0)  # past three resends' delays


async def test_run_now_committed_by_another_process_is_tickled_by_the_db_poll(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    task = await ns.ok("POST", "/api/tasks", json={"name": "t", "command": ["true"]})
    other = Stores.open(ns.settings.db_url)
    try:
        other.delivery.create_run(RunCreate(task_id=task["id"], computers=["pc1"]))
    finally:
        other.close()
    tickle, _ = await ts.tickle(within=2.0)
    assert tickle.kind is wire.Kind.TASKS


async def test_work_created_while_a_tickle_is_in_flight_is_not_missed(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    await ns.run_task(["pc1"], name="first")
    await ts.tickle(within=2.0)
    second = await ns.run_task(["pc1"], name="second")  # coalesced into the in-flight tickle
    wanted = second["executions"][0]["id"]
    work = await ts.ok("GET", "/api/ts/work")
    if wanted not in [w["execution_id"] for w in work["executions"]]:
        # the pull raced the run: the follow-up tickle after the ack announces it
        tickle, _ = await ts.tickle(within=2.0)
        assert tickle.kind is wire.Kind.TASKS
        work = await ts.ok("GET", "/api/ts/work")
    assert wanted in [w["execution_id"] for w in work["executions"]]
    execution = await ns.ok("GET", f"/api/executions/{wanted}")
    assert {s["step"]: s["at"] for s in execution["timeline"]}["ts_pulled"] is not None


async def test_burst_of_runs_coalesces_into_one_tickle(ns_factory: NsFactory) -> None:
    ns = await ns_factory(tickle_tries=1, tickle_backoff_max_s=1.0)
    ts = await ns.task_server("ts1")
    for i in range(5):
        await ts.agent(f"pc{i}")
    task = await ns.ok("POST", "/api/tasks", json={"name": "t", "command": ["true"]})
    for i in range(5):
        await ns.ok("POST", "/api/runs", json={"task_id": task["id"], "computers": [f"pc{i}"]})
    await ts.tickle(within=2.0)
    work = await ts.ok("GET", "/api/ts/work")
    assert len(work["executions"]) == 5
    # at most one follow-up (for runs created after the first send), never one per run
    extra = 0
    while True:
        try:
            await ts.tickle(within=1.0)
        except TimeoutError:
            break
        extra += 1
        await ts.ok("GET", "/api/ts/work")
    assert extra <= 1


async def test_check_pulls_during_the_resend_window_do_not_ack_and_the_task_server_ends_unreachable(
    ns_factory: NsFactory,
) -> None:
    # tickles to this task server are "blocked": it never acts on one, but its periodic check
    # lands inside every resend window (the worst case), pulling work and settings
    ns = await ns_factory(tickle_tries=3, tickle_backoff_s=0.2, tickle_backoff_max_s=0.4)
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    run = await ns.run_task(["pc1"])
    for _ in range(3):
        tickle, _ = await ts.tickle(within=2.0)
        assert tickle.kind is wire.Kind.TASKS
        work = await ts.ok("GET", "/api/ts/work?via=check")
        assert [w["execution_id"] for w in work["executions"]] == [run["executions"][0]["id"]]
        await ts.ok("GET", "/api/ts/settings?via=check")

    async def unreachable() -> bool:
        servers = await ns.ok("GET", "/api/task-servers")
        return bool(servers[0]["tickle_state"] == "unreachable")

    await wait_for(unreachable, within=3.0)
    servers = await ns.ok("GET", "/api/task-servers")
    assert servers[0]["last_pull_at"] is not None, "a check is still a pull operators see"
    assert ns.metrics.pulls.labels(via="check")._value.get() == 3
    assert ns.metrics.pulls.labels(via="tickle")._value.get() == 0


async def test_tickle_caused_pull_after_unanswered_tries_makes_the_task_server_reachable(
    ns_factory: NsFactory,
) -> None:
    ns = await ns_factory(tickle_tries=4, tickle_backoff_s=0.2, tickle_backoff_max_s=0.4)
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    await ns.run_task(["pc1"])
    await ts.tickle(within=2.0)
    await ts.ok("GET", "/api/ts/work?via=start")  # not an ack: the tickle is resent
    await ts.tickle(within=2.0)
    await ts.ok("GET", "/api/ts/work?via=tickle")

    await ts.no_tickle(within=4 * ns.settings.tickle_backoff_max_s)
    servers = await ns.ok("GET", "/api/task-servers")
    assert servers[0]["tickle_state"] == "reachable"
    assert ns.metrics.pulls.labels(via="tickle")._value.get() == 1


async def test_pull_without_via_from_an_older_task_server_acks_as_before(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    await ns.run_task(["pc1"])
    await ts.tickle(within=2.0)
    await ts.ok("GET", "/api/ts/work")
    await ts.no_tickle(within=4 * ns.settings.tickle_backoff_max_s)
    servers = await ns.ok("GET", "/api/task-servers")
    assert servers[0]["tickle_state"] == "reachable"


async def test_settings_check_pull_does_not_ack_the_settings_tickle(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    out = await ns.ok("PUT", "/api/settings", json={"task_request_interval_s": 120})
    tickle, _ = await ts.tickle(within=2.0)
    assert tickle.kind is wire.Kind.SETTINGS
    assert await ts.ok("GET", "/api/ts/settings?via=check") == out
    resent, _ = await ts.tickle(within=2.0)
    assert resent.kind is wire.Kind.SETTINGS
    assert resent.seq > tickle.seq
    await ts.ok("GET", "/api/ts/settings?via=tickle")
    await ts.no_tickle(within=4 * ns.settings.tickle_backoff_max_s)


async def test_check_pull_served_by_another_process_stamps_last_pull_but_does_not_ack(
    ns: Ns,
) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    await ns.run_task(["pc1"])
    first, _ = await ts.tickle(within=2.0)

    # another NS API process sharing the database serves a periodic check
    other = Stores.open(ns.settings.db_url)
    try:
        caller = other.inventory.caller_for(token_sha256(ts.token))
        assert caller is not None
        pulled_at = time.time()
        other.delivery.pull_work(caller, pulled_at, "check")
        other.settings.pull_settings(caller, pulled_at, "check")
        (link,) = other.inventory.task_server_links()
        assert (link.tickle_pulled_at, link.settings_pulled_at) == (None, None)
        servers = await ns.ok("GET", "/api/task-servers")
        assert servers[0]["last_pull_at"] == pulled_at
    finally:
        other.close()
    # the dispatcher (polling the database every 0.1 s) does not take it for an ack
    resent, _ = await ts.tickle(within=2.0)
    assert resent.kind is wire.Kind.TASKS
    assert resent.seq > first.seq


async def pull_failing_once(
    ns: Ns, ts: FakeTaskServer, fails: Callable[[str], bool]
) -> tuple[int, list[str]]:
    """The task server's tickle-caused pull, the first statement `fails` picks raising a database
    error (as a deadlock lost, or the database briefly away): its status, the statement failed."""
    failed: list[str] = []

    def fail_once(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if fails(statement) and not failed:
            failed.append(statement)
            raise OperationalError(statement, None, Exception("the database is away"))

    event.listen(ns.stores.database.engine, "before_cursor_execute", fail_once)
    try:
        status, _ = await ts.call("GET", "/api/ts/work?via=tickle")
    finally:
        event.remove(ns.stores.database.engine, "before_cursor_execute", fail_once)
    return status, failed


async def test_a_tickle_caused_pull_that_fails_is_tickled_again(ns: Ns) -> None:
    """The pull a tickle caused acknowledges it before it reads the work: when that pull fails
    (a deadlock lost on PostgreSQL, the database briefly away) the task server got nothing, and
    without another tickle its work waited for its periodic check (a minute: S3 stalled)."""
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    run = await ns.run_task(["pc1"])
    await ts.tickle(within=2.0)
    status, failed = await pull_failing_once(
        ns, ts, lambda sql: sql.startswith("UPDATE task_servers SET last_pull_at")
    )
    assert failed
    assert status == 500

    # not only at the task server's periodic check
    try:
        tickle: wire.Tickle | None = (await ts.tickle(within=2.0))[0]
    except TimeoutError:
        tickle = None
    work = await ts.ok("GET", "/api/ts/work?via=tickle")
    pulled = [w["execution_id"] for w in work["executions"]]
    record(
        case="The pull a tickle caused fails (after acknowledging it)",
        done="run now; the task server's tickle-caused pull answered 500 (database error)",
        outcome="tickled again at once, the next pull gets the work"
        if tickle is not None and pulled == [run["executions"][0]["id"]]
        else f"tickled again: {tickle is not None}, pulled {pulled}",
        tried=1,
    )
    assert tickle is not None, "no tickle after the failed pull"
    assert tickle.kind is wire.Kind.TASKS
    assert pulled == [run["executions"][0]["id"]]
    await ts.no_tickle(within=4 * ns.settings.tickle_backoff_max_s)


async def test_a_tickle_caused_pull_whose_cancels_read_fails_is_tickled_again(ns: Ns) -> None:
    """The pull reads the cancels its agents must hear of on the same trip as its work: when that
    read fails the whole pull fails (500), and, like any failed tickle-caused pull, the task
    server is tickled again rather than left to its periodic check."""
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    run = await ns.run_task(["pc1"])
    await ts.tickle(within=2.0)
    status, failed = await pull_failing_once(
        ns,
        ts,
        lambda sql: (
            sql.startswith("SELECT")
            and "cancel_requested_at >=" in sql
            and "execution_pulls" in sql
        ),  # the pull's, not the dispatcher's read of cancels unheard
    )
    assert failed, "the pull did not read its cancels"
    assert status == 500

    try:
        tickle: wire.Tickle | None = (await ts.tickle(within=2.0))[0]
    except TimeoutError:
        tickle = None
    assert tickle is not None, "no tickle after the pull whose cancels read failed"
    assert tickle.kind is wire.Kind.TASKS
    work = await ts.ok("GET", "/api/ts/work?via=tickle")
    assert [w["execution_id"] for w in work["executions"]] == [run["executions"][0]["id"]]


async def test_tickle_caused_pulls_that_keep_failing_are_tickled_again_a_bounded_number_of_times(
    ns: Ns,
) -> None:
    """A database that stays away: every pull fails. The tickle after a failed pull must not
    make tickle and pull chase each other for ever: at most the tickles' tries in a row."""
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    await ns.run_task(["pc1"])
    await ts.tickle(within=2.0)

    def fail_every_pull(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.startswith("UPDATE task_servers SET last_pull_at"):
            raise OperationalError(statement, None, Exception("the database is away"))

    tickles = 0
    event.listen(ns.stores.database.engine, "before_cursor_execute", fail_every_pull)
    try:
        for _ in range(3 * ns.settings.tickle_tries):  # bounded: the assert below says more
            status, _ = await ts.call("GET", "/api/ts/work?via=tickle")
            assert status == 500
            try:
                await ts.tickle(within=4 * ns.settings.tickle_backoff_max_s)
            except TimeoutError:
                break
            tickles += 1
    finally:
        event.remove(ns.stores.database.engine, "before_cursor_execute", fail_every_pull)
    record(
        case="Tickle-caused pulls keep failing (the database away)",
        done="every tickle answered by a pull that fails with 500",
        outcome=f"tickled again {tickles} times, then no more until a pull succeeds",
        tried=tickles + 1,
    )
    assert 1 <= tickles <= ns.settings.tickle_tries
