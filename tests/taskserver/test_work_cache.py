"""The work cache's commits: an agent's events synced before they are acknowledged, the work
pulled from the NS and the task server's own hop reports not synced."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.taskserver.conftest import work_for
from tickle.messages import StatusEvent, WorkOut
from tickle.metrics import ComponentMetrics
from tickle.outbox import Outbox, OutboxForwarder
from tickle.taskserver.store import Store
from tickle.taskserver.work_cache import WorkCache


async def _not_sent(bodies: list[str]) -> list[str]:
    raise AssertionError("the forwarder is not started in this test")


async def test_hop_reports_alone_are_not_synced_and_an_agents_events_are(tmp_path: Path) -> None:
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
    cache.apply(WorkOut(executions=[work_for(1, "pc1")]))  # the NS keeps the list: not synced

    await cache.tickled("pc1", 1000.0)
    await cache.pulled("pc1", "tickle")
    hops, statements[:] = list(statements), []
    finished = StatusEvent(event_id="finished-1", execution_id=1, computer="pc1",
                           kind="finished", at=1001.0, status="succeeded", exit_code=0)  # fmt: skip
    await cache.take_events("pc1", [finished])
    agents = list(statements)

    # the work pull's commit, then two hops, each one commit to the outbox and one to the
    # cache: unsynced, and the connections synced again after each
    assert hops.count("PRAGMA synchronous=NORMAL") == 5
    assert hops.count("PRAGMA synchronous=FULL") == 5
    assert not [s for s in agents if s.startswith("PRAGMA synchronous")]
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert outbox._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    # committed all the same: the hops and the agent's event queued, the flags set
    kinds = [StatusEvent.model_validate_json(body).kind for _, body in outbox.peek()]
    assert kinds == ["agent_tickled", "agent_pulled", "finished"]
    assert store.pending_work("pc1") == []  # done: out of the agent's pulls


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
        await cache.tickled("pc1", 1000.0)
        await cache.pulled("pc1", "tickle")
        started = StatusEvent(event_id="started-1", execution_id=1, computer="pc1",
                              kind="started", at=1001.0)  # fmt: skip
        await cache.take_events("pc1", [started])
        assert await forwarder.drained(10)
        assert ns.posts == [["agent_tickled", "agent_pulled", "started"]]
        await cache.tickled("pc2", 1002.0)  # no event of its agent follows: alone, soon
        assert await forwarder.drained(10)
        assert ns.posts[1:] == [["agent_tickled"]]
    finally:
        await forwarder.stop()
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
