"""A fan-out's pulls first: while a tickled agent's pull is due, the agents' status events are
held (`pulls_first_s` at most), then committed together; an agent alone is never held."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.taskserver.conftest import Agent, TaskServerHarness, wait_until, work_for
from tickle.messages import StatusEvent
from tickle.taskserver import work_cache

NO_RESEND_S = 60  # the tickle is not resent within a test: its pull stays due until it comes


def _event(execution_id: int, computer: str) -> dict[str, object]:
    return StatusEvent(
        event_id=str(uuid.uuid4()), execution_id=execution_id, computer=computer,
        kind="started", at=1.0,
    ).model_dump(mode="json")  # fmt: skip


def _posting(h: TaskServerHarness, agent: Agent, event: dict[str, object]) -> asyncio.Task[Any]:
    return asyncio.create_task(h.call(agent, "POST", "/api/agent/events", json={"events": [event]}))


def _watch_held(h: TaskServerHarness) -> list[int]:
    """For each event post that reaches the work cache, how many writes it holds once the post
    queued its own (held, or in this turn's commit)."""
    cache = h.running.work_cache
    taken = cache.take_events
    held: list[int] = []

    async def watching(computer: str, events: Any) -> list[str]:
        call = asyncio.ensure_future(taken(computer, events))
        await asyncio.sleep(0)  # it queued its write
        held.append(len(cache._held))
        return await call

    cache.take_events = watching  # type: ignore[method-assign]
    return held


async def _fan_out(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch, pulls_first_s: float
) -> tuple[Agent, Agent, Agent]:
    """A task server with one tickled agent whose pull is due, and two CEM agents, `pc1` having
    posted (alone: committed at once) so that `pc2` is not alone."""
    # a fleet, not an agent alone: any other agent's post within a minute says so
    monkeypatch.setattr(work_cache, "ALONE_WINDOW_S", 60.0)
    harness.overrides.update(
        pulls_first_s=pulls_first_s, tickle_backoff_s=NO_RESEND_S,
        tickle_backoff_max_s=NO_RESEND_S,
    )  # fmt: skip
    h = harness
    await h.start()
    await wait_until(lambda: h.ns.count("work") >= 1, what="the first work pull")
    tickled = await h.register_agent("tickled")
    pc1, pc2 = await h.register_agent("pc1", cem=True), await h.register_agent("pc2", cem=True)
    status, _ = await _posting(h, pc1, _event(1, "pc1"))
    assert status == 200
    await h.cache_work(work_for(9, "tickled"))
    await wait_until(lambda: tickled.socket.datagrams, what="the tickle")
    assert h.running.pulls_due.count == 1
    return tickled, pc1, pc2


@pytest.mark.timeout(60)
async def test_events_wait_while_a_tickled_agents_pull_is_due_and_go_together_once_it_came(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    tickled, pc1, pc2 = await _fan_out(h, monkeypatch, pulls_first_s=5)
    second, third = _event(2, "pc2"), _event(3, "pc1")
    posts = [_posting(h, pc2, second), _posting(h, pc1, third)]
    await wait_until(lambda: len(h.running.work_cache._held) == 2, what="both posts held")
    await asyncio.sleep(0.05)  # some turns of the loop: held, not committed nor answered
    assert not any(p.done() for p in posts)
    assert not {second["event_id"], third["event_id"]} & h.ns.events.keys()
    # the pull is served while the events wait: the fan-out's pulls first
    status, body = await h.call(tickled, "GET", "/api/agent/tasks", params={"via": "tickle"})
    assert status == 200
    assert [e["execution_id"] for e in body["executions"]] == [9]
    assert h.running.pulls_due.count == 0
    answers = await asyncio.wait_for(asyncio.gather(*posts), 10)
    assert [status for status, _ in answers] == [200, 200]
    await wait_until(
        lambda: {second["event_id"], third["event_id"]} <= h.ns.events.keys(),
        what="both events at the NS",
    )


@pytest.mark.timeout(60)
async def test_events_held_for_pulls_due_go_after_pulls_first_s_at_most(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    _, _, pc2 = await _fan_out(h, monkeypatch, pulls_first_s=0.2)
    event = _event(2, "pc2")
    status, body = await asyncio.wait_for(_posting(h, pc2, event), 10)
    assert status == 200, body
    assert body["accepted"] == [event["event_id"]]
    assert h.running.pulls_due.count == 1  # answered while the pull is still due
    await wait_until(lambda: event["event_id"] in h.ns.events, what="the event at the NS")


@pytest.mark.timeout(60)
async def test_with_pulls_first_s_0_events_are_not_held_for_pulls_due(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    _, _, pc2 = await _fan_out(h, monkeypatch, pulls_first_s=0)
    held = _watch_held(h)
    status, _ = await asyncio.wait_for(_posting(h, pc2, _event(2, "pc2")), 10)
    assert status == 200
    assert held == [0]
    assert h.running.pulls_due.count == 1


@pytest.mark.timeout(60)
async def test_an_agent_alone_is_not_held_for_pulls_due(harness: TaskServerHarness) -> None:
    # S1: one agent's run-now; another agent's tickle unanswered must not delay its events
    harness.overrides.update(
        pulls_first_s=5, tickle_backoff_s=NO_RESEND_S, tickle_backoff_max_s=NO_RESEND_S
    )
    h = harness
    await h.start()
    await wait_until(lambda: h.ns.count("work") >= 1, what="the first work pull")
    tickled = await h.register_agent("tickled")
    alone = await h.register_agent("pc1", cem=True)
    await h.cache_work(work_for(9, "tickled"))
    await wait_until(lambda: tickled.socket.datagrams, what="the tickle")
    held = _watch_held(h)
    status, _ = await asyncio.wait_for(_posting(h, alone, _event(1, "pc1")), 10)
    assert status == 200
    assert held == [0]
    assert h.running.pulls_due.count == 1
