"""The agents' writes commit in groups and are synced off the event loop (localdb.WalSync):
an answer waits for the sync of its own writes, the loop serves others meanwhile, and agents'
events that come while a sync runs are committed together after it and share the next one."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import pytest

from tests.taskserver.conftest import Agent, TaskServerHarness, wait_until, work_for
from tickle import agentapi
from tickle.localdb import WalSync
from tickle.messages import ExecutionWork, StatusEvent
from tickle.outbox import Outbox
from tickle.taskserver.store import OUTBOX_FILE
from tickle.taskserver.work_cache import WorkCache


def _event(execution_id: int, computer: str, kind: str = "started") -> dict[str, object]:
    return StatusEvent(
        event_id=str(uuid.uuid4()), execution_id=execution_id, computer=computer,
        kind=kind, at=1.0,  # type: ignore[arg-type]
    ).model_dump(mode="json")  # fmt: skip


class Gate:
    """Holds the task server's WAL syncs (in their thread) until opened; counts those started.
    Opened at the end of the test in any case (`gate` fixture)."""

    def __init__(self, wal_sync: WalSync) -> None:
        self.opened = threading.Event()
        self.started = 0
        real = wal_sync._sync_files

        def held() -> None:
            self.started += 1
            if not self.opened.wait(30):
                raise OSError("the test never opened the gate")
            real()

        wal_sync._sync_files = held  # type: ignore[method-assign]


@pytest.fixture
async def gate(task_server: TaskServerHarness) -> AsyncIterator[Gate]:
    held = Gate(task_server.running.wal_sync)
    yield held
    held.opened.set()


def _count_takes(h: TaskServerHarness) -> list[str]:
    """The computers whose event posts reached the work cache, as they come."""
    cache = h.running.work_cache
    take_events = cache.take_events
    taken: list[str] = []

    async def counting(computer: str, events: Any) -> list[str]:
        taken.append(computer)
        return await take_events(computer, events)

    cache.take_events = counting  # type: ignore[method-assign]
    return taken


async def _offline_with_work(h: TaskServerHarness, *work: ExecutionWork) -> WorkCache:
    """Agents pc1 and pc2 registered, `work` cached, the NS gone (events stay in the outbox)."""
    await h.register_agent("pc1", cem=True)
    await h.register_agent("pc2", cem=True)
    await h.cache_work(*work)
    await h.ns.stop()
    return h.running.work_cache


def _posting(h: TaskServerHarness, agent: Agent, *events: dict[str, object]) -> asyncio.Task[Any]:
    """`agent`'s post of `events`, on its way."""
    return asyncio.create_task(
        h.call(agent, "POST", "/api/agent/events", json={"events": list(events)})
    )


def _on_disk(state_dir: Path) -> int:
    """The events a restart would find in the outbox (another connection reads the file)."""
    outbox = Outbox(state_dir / OUTBOX_FILE)
    try:
        return outbox.depth()
    finally:
        outbox.close()


@pytest.mark.timeout(60)
async def test_an_event_post_is_answered_only_after_its_writes_are_synced(
    task_server: TaskServerHarness, gate: Gate
) -> None:
    h = task_server
    agent = await h.register_agent("pc1", cem=True)
    await h.ns.stop()  # the events stay in the outbox (not forwarded): counted there
    post = _posting(h, agent, _event(1, "pc1"))
    await wait_until(lambda: gate.started == 1, what="the sync of the post's writes")
    # committed (a pull would see it) but not synced: the agent is not answered yet, and the
    # event loop goes on serving others meanwhile
    assert h.running.outbox.depth() == 1
    status, _ = await h.call(None, "GET", "/health")
    assert status == 200
    assert not post.done()

    gate.opened.set()
    status, body = await post
    assert status == 200, body
    assert len(body["accepted"]) == 1
    assert _on_disk(h.state_dir) == 1  # what a restart finds


@pytest.mark.timeout(60)
async def test_events_posted_while_a_sync_runs_commit_together_after_it_and_share_the_next_sync(
    task_server: TaskServerHarness, gate: Gate
) -> None:
    h = task_server
    agents = [await h.register_agent(f"pc{i:02d}", cem=True) for i in range(40)]
    await h.ns.stop()  # the events stay in the outbox (not forwarded): counted there
    commits: list[int] = []  # events per outbox commit
    queue_bodies = h.running.forwarder.queue_bodies

    def counted(
        bodies: Iterable[tuple[str, str]], durable: bool, within_s: float | None
    ) -> list[str]:
        listed = list(bodies)
        commits.append(len(listed))
        return queue_bodies(listed, durable, within_s)

    h.running.forwarder.queue_bodies = counted  # type: ignore[method-assign]
    taken = _count_takes(h)
    first = asyncio.create_task(
        h.call(agents[0], "POST", "/api/agent/events", json={"events": [_event(1, "pc00")]})
    )
    await wait_until(lambda: gate.started == 1, what="the first sync")
    rest = [
        asyncio.create_task(
            h.call(a, "POST", "/api/agent/events", json={"events": [_event(100 + i, a.name)]})
        )
        for i, a in enumerate(agents[1:])
    ]
    # every post reached the work cache and waits: held, not committed, while the sync runs
    await wait_until(lambda: len(taken) == 40, what="every post at the work cache")
    await asyncio.sleep(0)  # a turn of the loop: a group commit of this turn would run now
    assert h.running.outbox.depth() == 1
    assert not any(t.done() for t in [first, *rest])

    gate.opened.set()
    answers = await asyncio.gather(first, *rest)
    assert all(status == 200 for status, body in answers)
    assert all(len(body["accepted"]) == 1 for _, body in answers)
    assert commits == [1, 39]  # the first post's commit, then one for the 39 held
    assert gate.started == 2  # the first post's sync, then one for the 39
    assert _on_disk(h.state_dir) == 40


@pytest.mark.timeout(60)
async def test_a_lone_agents_event_posted_while_its_last_one_syncs_goes_to_the_ns_at_once(
    task_server: TaskServerHarness, gate: Gate
) -> None:
    # S1: one agent's `finished` came while its `started` (two milliseconds before) was being
    # synced, and waited for that sync before it went to the NS
    h = task_server
    agent = await h.register_agent("pc1", cem=True)
    started = _event(1, "pc1")
    first = _posting(h, agent, started)
    await wait_until(lambda: gate.started == 1, what="the sync of the first post")
    finished = _event(1, "pc1", "finished")
    second = _posting(h, agent, finished)
    # committed and forwarded while the first sync still runs
    await wait_until(lambda: finished["event_id"] in h.ns.events, what="the event at the NS")
    assert not first.done(), "answered only once synced"
    assert not second.done(), "answered only once synced"
    gate.opened.set()
    for post in (first, second):
        status, body = await asyncio.wait_for(post, 10)
        assert status == 200, body
    assert gate.started == 2  # the first post's sync, then the second's


@pytest.mark.timeout(60)
async def test_another_agents_post_ends_being_alone_its_events_wait_for_the_running_sync(
    task_server: TaskServerHarness, gate: Gate
) -> None:
    h = task_server
    one, other = await h.register_agent("pc1", cem=True), await h.register_agent("pc2", cem=True)
    first = _posting(h, one, _event(1, "pc1"))
    await wait_until(lambda: gate.started == 1, what="the sync of the first post")
    await wait_until(lambda: len(h.ns.events) == 1, what="the first post's event at the NS")
    await wait_until(lambda: h.running.outbox.depth() == 0, what="the NS's answer to it")
    taken = _count_takes(h)
    posts = [_posting(h, agent, _event(n, agent.name)) for n, agent in ((2, other), (3, one))]
    await wait_until(lambda: len(taken) == 2, what="both posts at the work cache")
    await asyncio.sleep(0)  # a turn of the loop: a group commit of this turn would run now
    # pc1 is not alone any more (pc2 posted): both held for the running sync, nothing forwarded
    assert len(h.ns.events) == 1
    assert h.running.outbox.depth() == 0
    gate.opened.set()
    answers = await asyncio.wait_for(asyncio.gather(first, *posts), 10)
    assert [status for status, _ in answers] == [200, 200, 200]
    await wait_until(lambda: len(h.ns.events) == 3, what="every event at the NS")


@pytest.mark.timeout(60)
async def test_a_finished_event_held_for_the_next_commit_keeps_its_execution_out_of_pulls(
    task_server: TaskServerHarness, gate: Gate
) -> None:
    h = task_server
    cache = await _offline_with_work(h, work_for(7, "pc1"), work_for(8, "pc1"), work_for(9, "pc2"))

    def finished(execution_id: int, computer: str) -> agentapi.StatusEvent:
        return agentapi.StatusEvent(
            event_id=str(uuid.uuid4()), execution_id=execution_id, computer=computer,
            kind="finished", at=1.0, status="succeeded", exit_code=0,
        )  # fmt: skip

    running = asyncio.create_task(cache.take_events("pc2", [finished(9, "pc2")]))
    await wait_until(lambda: gate.started == 1, what="a sync running")
    held = asyncio.create_task(cache.take_events("pc1", [finished(7, "pc1")]))
    await asyncio.sleep(0)  # it reached the cache: held while the sync runs
    assert h.running.outbox.depth() == 1
    pulled = cache.pulled("pc1", "poll")
    assert [w.execution_id for w in pulled] == [8]  # 7 is being finished
    gate.opened.set()
    await asyncio.wait_for(asyncio.gather(running, held), 10)
    assert [w.execution_id for w in cache.pulled("pc1", "poll")] == [8]


@pytest.mark.timeout(60)
async def test_a_failed_sync_leaves_the_post_unacknowledged(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1", cem=True)

    def broken() -> None:
        raise OSError(5, "Input/output error")

    h.running.wal_sync._sync_files = broken  # type: ignore[method-assign]
    status, _ = await h.call(
        agent, "POST", "/api/agent/events", json={"events": [_event(1, "pc1")]}
    )
    assert status == 500  # not acknowledged: the agent keeps its copy and posts it again


@pytest.mark.timeout(60)
async def test_a_pull_waits_for_no_sync_its_pulled_hop_alone_is_not_synced(
    task_server: TaskServerHarness, gate: Gate
) -> None:
    h = task_server
    agent = await h.register_agent("pc1", cem=True)
    await h.cache_work(work_for(7, "pc1"))
    # the gate stays closed: a pull that waited for a sync would never be answered
    status, body = await asyncio.wait_for(
        h.call(agent, "GET", "/api/agent/tasks?via=poll"), timeout=30
    )
    assert status == 200
    assert [w["execution_id"] for w in body["executions"]] == [7]
    assert gate.started == 0


@pytest.mark.timeout(60)
async def test_a_pull_committed_with_an_agents_events_is_answered_before_their_sync(
    task_server: TaskServerHarness, gate: Gate
) -> None:
    # S5 (2,500 agents of one task server): the pulls committed in the turn of other agents'
    # events waited for those events' sync, which the pulls' own hop report does not need
    h = task_server
    cache = await _offline_with_work(h, work_for(7, "pc1"), work_for(8, "pc2"))
    event = agentapi.StatusEvent(
        event_id=str(uuid.uuid4()), execution_id=8, computer="pc2", kind="started", at=1.0
    )
    # both in one turn of the event loop: one group commit
    events = asyncio.create_task(cache.take_events("pc2", [event]))
    pulled = cache.pulled("pc1", "poll")  # answered at once: its hop report rides the commit
    assert [w.execution_id for w in pulled] == [7]
    await wait_until(lambda: gate.started == 1, what="the sync of the events' writes")
    assert h.running.outbox.depth() == 2  # the event and the hop report, committed together
    assert not events.done(), "the agent's events are answered only once synced"
    gate.opened.set()
    assert await asyncio.wait_for(events, 10) == [event.event_id]
