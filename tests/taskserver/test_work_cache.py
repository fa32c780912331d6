"""The work cache's commits: an agent's events synced before they are acknowledged, the work
pulled from the NS not synced, the task server's own hop reports waited for by nobody: they ride
the agent's events' commit, or commit alone (not synced) within HOP_COMMIT_S."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.taskserver.conftest import work_for
from tickle.messages import StatusEvent, WorkOut
from tickle.metrics import ComponentMetrics
from tickle.outbox import Outbox, OutboxForwarder
from tickle.taskserver import work_cache
from tickle.taskserver.store import Store
from tickle.taskserver.work_cache import HOP_COMMIT_S, WorkCache
from tickle.tickling import PullsDue


async def _not_sent(bodies: list[str]) -> list[str]:
    raise AssertionError("the forwarder is not started in this test")


async def test_hop_reports_ride_the_agents_events_commit_and_alone_commit_unsynced_soon(
    tmp_path: Path,
) -> None:
    store, outbox = Store(tmp_path), Outbox(tmp_path / "outbox.db")
    try:
        await _check_commits(store, outbox)
    finally:
        store.close()
        outbox.close()


async def _check_commits(store: Store, outbox: Outbox) -> None:
    metrics = ComponentMetrics("ts")
    cache = WorkCache(store, OutboxForwarder(outbox, _not_sent, metrics), metrics)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    outbox._db.set_trace_callback(statements.append)
    # the NS keeps the list: not synced
    cache.apply(WorkOut(executions=[work_for(1, "pc1"), work_for(2, "pc2")]))
    assert statements.count("PRAGMA synchronous=NORMAL") == 1
    statements[:] = []

    cache.tickled("pc1", 1000.0)
    assert [w.execution_id for w in cache.pulled("pc1", "tickle")] == [1]
    cache.pulled("pc1", "tickle")  # pulled again before the report committed: reported once
    assert statements == []  # the pull is answered before its hop report commits
    finished = StatusEvent(event_id="finished-1", execution_id=1, computer="pc1",
                           kind="finished", at=1001.0, status="succeeded", exit_code=0)  # fmt: skip
    await cache.take_events("pc1", [finished])
    # one commit for the hop reports and the agent's event: synced (no unsynced commit)
    assert statements.count("COMMIT") == 2  # the outbox's and the cache's
    assert not [s for s in statements if s.startswith("PRAGMA synchronous")]
    kinds = [StatusEvent.model_validate_json(body).kind for _, body in outbox.peek()]
    assert kinds == ["agent_tickled", "agent_pulled", "finished"]
    assert store.pending_work("pc1") == []  # done: out of the agent's pulls

    # a hop report no event follows: committed alone within HOP_COMMIT_S, not synced
    statements[:] = []
    cache.tickled("pc2", 1002.0)
    assert statements == []
    await _until(lambda: outbox.depth() == 4, HOP_COMMIT_S + 5)
    assert statements.count("PRAGMA synchronous=NORMAL") == 2  # the outbox's and the cache's
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
    assert outbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    assert [w.agent_tickled for w in store.pending_work("pc2")] == [True]


async def _until(check: Callable[[], bool], within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, "not within the bound"
        await asyncio.sleep(0.01)


class _Posts:
    """The NS's event posts: the kinds of each."""

    def __init__(self) -> None:
        self.posts: list[list[str]] = []

    async def send(self, bodies: list[str]) -> list[str]:
        events = [StatusEvent.model_validate_json(body) for body in bodies]
        self.posts.append([e.kind for e in events])
        return [e.event_id for e in events]


async def test_hop_reports_go_to_the_ns_with_the_agents_next_event(tmp_path: Path) -> None:
    # each went alone: S1 made four posts (and NS transactions) a run, two of them hop reports
    store, outbox, ns = Store(tmp_path), Outbox(tmp_path / "outbox.db"), _Posts()
    metrics = ComponentMetrics("ts")
    forwarder = OutboxForwarder(outbox, ns.send, metrics)
    cache = WorkCache(store, forwarder, metrics)
    forwarder.start()
    try:
        cache.apply(WorkOut(executions=[work_for(1, "pc1"), work_for(2, "pc2")]))
        cache.tickled("pc1", 1000.0)
        cache.pulled("pc1", "tickle")
        started = StatusEvent(event_id="started-1", execution_id=1, computer="pc1",
                              kind="started", at=1001.0)  # fmt: skip
        await cache.take_events("pc1", [started])
        assert await forwarder.drained(10)
        assert ns.posts == [["agent_tickled", "agent_pulled", "started"]]
        cache.tickled("pc2", 1002.0)  # no event of its agent follows: alone, soon
        await _until(lambda: cache.uncommitted == 0, HOP_COMMIT_S + 5)
        assert await forwarder.drained(10)
        assert ns.posts[1:] == [["agent_tickled"]]
    finally:
        await forwarder.stop()
        store.close()
        outbox.close()


async def test_a_backlog_goes_to_the_ns_execution_by_execution(tmp_path: Path) -> None:
    # committed as they came, hop by hop (every agent's tickle, then every pull, then the
    # agents' events), a fan-out's events went to the NS one execution at a time per post
    store, outbox = Store(tmp_path), Outbox(tmp_path / "outbox.db")
    metrics = ComponentMetrics("ts")
    cache = WorkCache(store, OutboxForwarder(outbox, _not_sent, metrics), metrics)
    try:
        agents = {3: "pc3", 1: "pc1", 2: "pc2"}
        cache.apply(WorkOut(executions=[work_for(eid, pc) for eid, pc in agents.items()]))
        for pc in agents.values():
            cache.tickled(pc, 1000.0)
        await _until(lambda: cache.uncommitted == 0, HOP_COMMIT_S + 5)
        for pc in agents.values():
            cache.pulled(pc, "tickle")
        await _until(lambda: cache.uncommitted == 0, HOP_COMMIT_S + 5)
        for eid, pc in agents.items():
            await cache.take_events(pc, [
                StatusEvent(event_id=f"{kind}-{eid}", execution_id=eid, computer=pc, kind=kind,
                            at=1001.0)
                for kind in ("started", "finished")
            ])  # fmt: skip
        events = [StatusEvent.model_validate_json(body) for _, body in outbox.peek(limit=100)]
        hops = ["agent_tickled", "agent_pulled", "started", "finished"]
        assert [(e.execution_id, e.kind) for e in events] == [
            (eid, kind) for eid in (1, 2, 3) for kind in hops
        ]
    finally:
        store.close()
        outbox.close()


async def test_an_event_posted_twice_into_one_commit_is_counted_once(tmp_path: Path) -> None:
    # a retried post can join the commit of the first (held while a sync runs): the event is
    # queued once, and counted once
    store, outbox = Store(tmp_path), Outbox(tmp_path / "outbox.db")
    metrics = ComponentMetrics("ts")
    cache = WorkCache(store, OutboxForwarder(outbox, _not_sent, metrics), metrics)
    try:
        cache.apply(WorkOut(executions=[work_for(1, "pc1")]))
        started = StatusEvent(event_id="started-1", execution_id=1, computer="pc1",
                              kind="started", at=1001.0)  # fmt: skip
        first, again = await asyncio.gather(
            cache.take_events("pc1", [started]), cache.take_events("pc1", [started])
        )
        assert first == again == ["started-1"]
        assert outbox.depth() == 1
        counted = metrics.status_events.labels(kind="started")._value.get()
        assert counted == 1
    finally:
        store.close()
        outbox.close()


def test_a_large_work_pull_is_logged_in_one_short_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, outbox = Store(tmp_path), Outbox(tmp_path / "outbox.db")
    try:
        metrics = ComponentMetrics("ts")
        cache = WorkCache(store, OutboxForwarder(outbox, _not_sent, metrics), metrics)
        with caplog.at_level(logging.INFO, logger="tickle.taskserver.work_cache"):
            cache.apply(WorkOut(executions=[work_for(i, f"pc{i}") for i in range(1, 2501)]))
            cache.apply(WorkOut(executions=[work_for(i, f"pc{i}") for i in range(1, 2504)]))
    finally:
        store.close()
        outbox.close()
    assert caplog.messages == [
        "work from the NS: 2500 new executions [1, 2, 3, 4, 5, 6, 7, …, 2500]",
        "work from the NS: 3 new executions [2501, 2502, 2503]",
    ]


async def test_many_agents_events_commit_in_bounded_transactions_with_the_loop_served_between(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a fan-out's held events went in one transaction: 2,500 agents' events and hop reports
    # held a task server's event loop 0.58 s (wall time, in 6 commits), the pulls due waiting
    monkeypatch.setattr(work_cache, "COMMIT_MAX_WRITES", 2)
    store, outbox = Store(tmp_path), Outbox(tmp_path / "outbox.db")
    metrics = ComponentMetrics("ts")
    cache = WorkCache(store, OutboxForwarder(outbox, _not_sent, metrics), metrics)
    trace: list[str] = []
    outbox._db.set_trace_callback(lambda s: trace.append("commit") if s == "COMMIT" else None)
    turning = True

    async def turns() -> None:  # another request's work, one turn of the loop at a time
        while turning:
            trace.append("turn")
            await asyncio.sleep(0)

    try:
        names = [f"pc{i}" for i in range(1, 6)]
        cache.apply(WorkOut(executions=[work_for(i, n) for i, n in enumerate(names, 1)]))
        finished = [
            StatusEvent(
                event_id=f"finished-{i}",
                execution_id=i,
                computer=n,
                kind="finished",
                at=1000.0 + i,
                status="succeeded",
                exit_code=0,
            )
            for i, n in enumerate(names, 1)
        ]
        other = asyncio.create_task(turns())
        answers = await asyncio.gather(*(cache.take_events(e.computer, [e]) for e in finished))
        turning = False
        await other
        assert answers == [[e.event_id] for e in finished]  # each answered, once committed
        assert sorted(eid for eid, _ in outbox.peek()) == sorted(e.event_id for e in finished)
        assert store.pending_work() == []
        commits = [i for i, what in enumerate(trace) if what == "commit"]
        assert len(commits) == 3  # 5 writes, 2 a transaction
        # the loop turned between each transaction and the next
        assert all("turn" in trace[a:b] for a, b in itertools.pairwise(commits))
    finally:
        store.close()
        outbox.close()


async def test_crowded_the_events_held_for_the_pulls_due_commit_at_once(tmp_path: Path) -> None:
    # a held post keeps its agent's connection: crowded, the task server holds none, and those
    # it holds go at once (`release_now`), or the fan-out waits for room they keep taken
    store, outbox = Store(tmp_path), Outbox(tmp_path / "outbox.db")
    metrics = ComponentMetrics("ts")
    due = PullsDue()
    due.add()  # a tickled agent's pull is due all along
    cache = WorkCache(
        store, OutboxForwarder(outbox, _not_sent, metrics), metrics, pulls_due=due,
        pulls_first_s=30,
    )  # fmt: skip
    crowded = False
    cache.crowded = lambda: crowded
    try:
        names = ["pc1", "pc2", "pc3"]
        cache.apply(WorkOut(executions=[work_for(i, n) for i, n in enumerate(names, 1)]))
        started = [
            StatusEvent(event_id=f"started-{i}", execution_id=i, computer=n, kind="started",
                        at=1000.0 + i)
            for i, n in enumerate(names, 1)
        ]  # fmt: skip
        async with asyncio.timeout(5):  # an agent alone is never held
            assert await cache.take_events("pc1", [started[0]]) == ["started-1"]
        held = asyncio.create_task(cache.take_events("pc2", [started[1]]))
        await _until(lambda: cache.uncommitted == 1, 5)  # held for the pull due (30 s at most)
        assert not held.done()
        crowded = True
        cache.release_now()  # the connections turned crowded
        async with asyncio.timeout(5):
            assert await held == ["started-2"]
        async with asyncio.timeout(5):  # crowded: not held at all
            assert await cache.take_events("pc3", [started[2]]) == ["started-3"]
        assert due.count == 1  # the pull still due all along
    finally:
        store.close()
        outbox.close()
