"""The task server's long-polls: held cheaply per agent, answered at once when work, a cancel or
new settings arrive, bounded apart from the other connections; never a tickle to a CEM agent."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.reliability import record
from tickle.messages import AgentTasks, SettingsOut
from tickle.metrics import ComponentMetrics
from tickle.serving import RETRY_AFTER_S
from tickle.taskserver.long_polls import LongPolls
from tickle.taskserver.policy import policy_for
from tickle.taskserver.refusal import Refused

from .conftest import Agent, FakeNs, TaskServerHarness, wait_until, work_for

WAIT = "/api/agent/tasks/wait"


def _settings(version: int = 1, long_poll: bool = True, timeout_s: int = 30) -> SettingsOut:
    return SettingsOut(
        version=version, task_request_interval_s=1800, poll_jitter_fraction=0.1,
        ts_check_interval_s=60, long_poll=long_poll, long_poll_timeout_s=timeout_s,
    )  # fmt: skip


@pytest.fixture
async def long_polling(fake_ns: FakeNs, harness: TaskServerHarness) -> TaskServerHarness:
    """A started task server whose NS has long-poll on."""
    fake_ns.settings = _settings()
    await harness.start()
    await wait_until(lambda: harness.ns.count("work") >= 1, what="the first work pull")
    return harness


def _long_poll(h: TaskServerHarness, agent: Agent, **params: str) -> asyncio.Task[Any]:
    """Start agent's long-poll in the background; wait for it once it waits at the server."""
    return asyncio.create_task(h.call(agent, "GET", WAIT, params=params or None))


async def _waiting(h: TaskServerHarness, name: str) -> None:
    await wait_until(lambda: h.running.long_polls.waiting(name), what=f"{name}'s long-poll")


async def test_long_poll_is_refused_while_the_setting_is_off(
    task_server: TaskServerHarness,
) -> None:
    agent = await task_server.register_agent("cem1", cem=True)
    status, body = await task_server.call(agent, "GET", WAIT)
    assert status == 409
    assert "long-poll is off" in body["detail"]
    assert agent.enrollment.policy.long_poll is False


async def test_cem_agent_long_poll_is_answered_when_work_arrives_and_no_tickle_is_sent(
    long_polling: TaskServerHarness,
) -> None:
    h = long_polling
    agent = await h.register_agent("cem1", cem=True)
    assert agent.enrollment.policy.long_poll is True
    waiting = _long_poll(h, agent)
    await _waiting(h, "cem1")
    assert h.running.metrics.long_polls_waiting._value.get() == 1
    await h.cache_work(work_for(1, "cem1"))
    status, body = await asyncio.wait_for(waiting, 5)
    assert status == 200
    assert [e["execution_id"] for e in body["executions"]] == [1]
    assert await h.reported(5)
    (pulled,) = h.ns.events_of("agent_pulled")
    assert pulled.via == "long_poll"
    assert not h.ns.events_of("agent_tickled")
    assert agent.socket.datagrams == []  # the tickler never sends to a CEM agent
    assert h.running.metrics.tickles_skipped_cem._value.get() >= 1
    assert h.running.metrics.long_polls_waiting._value.get() == 0
    # pulled: the next long-poll waits again
    again = _long_poll(h, agent)
    await _waiting(h, "cem1")
    h.running.long_polls.close()
    assert (await asyncio.wait_for(again, 5))[0] == 204


async def test_long_poll_returns_at_once_for_work_not_pulled_yet_or_older_settings(
    long_polling: TaskServerHarness,
) -> None:
    h = long_polling
    agent = await h.register_agent("cem1", cem=True)
    await h.cache_work(work_for(1, "cem1"))
    status, body = await asyncio.wait_for(h.call(agent, "GET", WAIT), 5)
    assert (status, [e["execution_id"] for e in body["executions"]]) == (200, [1])
    status, body = await asyncio.wait_for(
        h.call(agent, "GET", WAIT, params={"settings_version": "0"}), 5
    )
    assert status == 200
    assert body["policy"]["settings_version"] == 1


async def test_settings_change_and_cancel_answer_the_long_poll(
    long_polling: TaskServerHarness,
) -> None:
    h = long_polling
    agent = await h.register_agent("cem1", cem=True)
    waiting = _long_poll(h, agent, settings_version="1")
    await _waiting(h, "cem1")
    h.ns.settings = _settings(version=2)
    await h.running.sync.settings.run("check")
    status, body = await asyncio.wait_for(waiting, 5)
    assert (status, body["policy"]["settings_version"]) == (200, 2)

    await h.cache_work(work_for(1, "cem1"))
    assert (await h.call(agent, "GET", "/api/agent/tasks"))[0] == 200  # the agent has it
    waiting = _long_poll(h, agent, settings_version="2")
    await _waiting(h, "cem1")
    h.ns.cancel = [1]
    await h.cache_work(work_for(1, "cem1"))
    status, body = await asyncio.wait_for(waiting, 5)
    assert (status, body["cancel"], body["executions"]) == (200, [1], [])
    assert agent.socket.datagrams == []


async def test_a_second_long_poll_of_the_same_agent_ends_the_first(
    long_polling: TaskServerHarness,
) -> None:
    h = long_polling
    agent = await h.register_agent("cem1", cem=True)
    first = _long_poll(h, agent)
    await _waiting(h, "cem1")
    second = _long_poll(h, agent)
    assert (await asyncio.wait_for(first, 5))[0] == 204
    assert len(h.running.long_polls) == 1
    await h.cache_work(work_for(1, "cem1"))
    assert (await asyncio.wait_for(second, 5))[0] == 200


async def test_a_tickle_unreachable_agent_long_polls_and_a_reachable_one_does_not(
    long_polling: TaskServerHarness,
) -> None:
    h = long_polling
    agent = await h.register_agent("pc1")
    assert agent.enrollment.policy.long_poll is False  # tickles reach it, as far as we know
    assert (await h.call(agent, "GET", WAIT))[0] == 409
    h.ns.work = [work_for(1, "pc1")]
    h.send_tickle(h.ns.tickle())  # it never pulls: declared tickle-unreachable after 3 tries
    await wait_until(lambda: "pc1" in h.running.agents.unreachable, what="pc1 unreachable")
    status, body = await h.call(agent, "GET", "/api/agent/policy")
    assert body["long_poll"] is True
    status, body = await asyncio.wait_for(h.call(agent, "GET", WAIT), 5)  # its work waits
    assert (status, [e["execution_id"] for e in body["executions"]]) == (200, [1])


async def _unreachable_agent(h: TaskServerHarness, name: str) -> Agent:
    """An agent with work whose tickles it never answers: declared tickle-unreachable."""
    agent = await h.register_agent(name)
    h.ns.work = [work_for(1, name)]
    h.send_tickle(h.ns.tickle())
    await wait_until(lambda: name in h.running.agents.unreachable, what=f"{name} unreachable")
    return agent


async def _restart(h: TaskServerHarness) -> None:
    h.pin_ports()
    await h.stop()
    await h.start()


async def test_a_tickle_unreachable_agent_still_long_polls_after_a_task_server_restart(
    long_polling: TaskServerHarness,
) -> None:
    # what the task server learnt (and told the NS) survives it: after a restart the agent
    # behind a firewall is not left polling every 30 minutes until a new tickle goes unanswered
    h = long_polling
    agent = await _unreachable_agent(h, "pc1")
    await _restart(h)

    assert "pc1" in h.running.agents.unreachable
    status, body = await h.call(agent, "GET", "/api/agent/policy")
    assert (status, body["long_poll"]) == (200, True)


async def test_an_agent_that_pulls_after_a_tickle_is_tickle_reachable_again_for_good(
    long_polling: TaskServerHarness,
) -> None:
    h = long_polling
    agent = await _unreachable_agent(h, "pc1")
    await h.cache_work(work_for(1, "pc1"), work_for(2, "pc1"))  # work 2 is tickled
    pulled = await h.call(agent, "GET", "/api/agent/tasks", params={"via": "tickle"})
    assert pulled[0] == 200  # the pull answers the tickle
    await wait_until(lambda: "pc1" not in h.running.agents.unreachable, what="pc1 reachable")
    await _restart(h)

    assert "pc1" not in h.running.agents.unreachable


async def test_long_polls_wait_beside_the_connection_cap_and_health_still_answers(
    fake_ns: FakeNs, harness: TaskServerHarness
) -> None:
    h = harness
    fake_ns.settings = _settings()
    h.overrides.update(max_connections=16, max_long_polls=40)
    await h.start()
    agents = [await h.register_agent(f"cem{i}", cem=True) for i in range(24)]
    # each long-poll on a connection of its own, as 24 agents do
    sessions = [aiohttp.ClientSession() for _ in agents]
    try:
        waiting = [
            asyncio.create_task(s.get(h.url + WAIT, headers={"Authorization": f"Bearer {a.token}"}))
            for s, a in zip(sessions, agents, strict=True)
        ]
        await wait_until(lambda: len(h.running.long_polls) == 24, what="24 long-polls waiting")
        health = []
        for _ in range(3):  # more connections than max_connections - 24 would leave
            async with aiohttp.ClientSession() as s, s.get(h.url + "/health") as resp:
                health.append(resp.status)
        still_waiting = len(h.running.long_polls)
        record(
            case="Idle long-polls vs the connection cap",
            done="24 agents hold long-polls on a task server with max_connections 16, then new "
            "connections ask /health",
            outcome="every long-poll kept, /health answered"
            if health == [200] * 3 and still_waiting == 24
            else f"health {health}, {still_waiting}/24 long-polls kept",
            tried=27,
        )
        assert health == [200] * 3
        # idle kept-alive connections may be closed for them; a waiting long-poll never is
        assert still_waiting == 24
        assert h.running.metrics.http_refused.labels(reason="over_capacity")._value.get() == 0
        await h.cache_work(*(work_for(i + 1, a.name) for i, a in enumerate(agents)))
        for task in waiting:
            resp = await asyncio.wait_for(task, 10)
            assert resp.status == 200
            resp.release()
    finally:
        for s in sessions:
            await s.close()


async def test_past_max_long_polls_one_more_is_refused() -> None:
    polls = LongPolls(ComponentMetrics("task-server"), max_waiting=1)
    answer = AgentTasks(executions=[], policy=policy_for(None, cem=True))

    async def respond(names: list[str]) -> dict[str, AgentTasks]:
        return dict.fromkeys(names, answer)

    polls.respond = respond
    first = asyncio.create_task(polls.wait("a", 10))
    await wait_until(lambda: polls.waiting("a"))
    with pytest.raises(Refused) as refused:
        await polls.wait("b", 10)
    assert refused.value.status == 503
    assert polls.wake(["a", "b"]) == 1
    assert await first is answer
    assert await polls.wait("b", 0.05) is None  # the bound: empty
    assert len(polls) == 0


async def test_a_long_poll_past_max_long_polls_is_refused_with_retry_after(
    fake_ns: FakeNs, harness: TaskServerHarness
) -> None:
    """The agent told 503 waits at least Retry-After before it long-polls again (no hammering)."""
    h = harness
    fake_ns.settings = _settings()
    h.overrides.update(max_long_polls=1)
    await h.start()
    first, second = [await h.register_agent(f"cem{i}", cem=True) for i in range(2)]
    waiting = _long_poll(h, first)
    await _waiting(h, "cem0")
    async with h.http.get(
        h.url + WAIT, headers={"Authorization": f"Bearer {second.token}"}
    ) as resp:
        assert resp.status == 503
        assert "long-polls already" in (await resp.json())["detail"]
        assert resp.headers.get("Retry-After") == str(RETRY_AFTER_S)
    waiting.cancel()


async def test_many_woken_together_are_answered_in_one_commit(
    long_polling: TaskServerHarness,
) -> None:
    h = long_polling
    agents = [await h.register_agent(f"cem{i}", cem=True) for i in range(5)]
    waiting = [_long_poll(h, a) for a in agents]
    await wait_until(lambda: len(h.running.long_polls) == 5, what="5 long-polls")
    commits = 0
    queue = h.running.forwarder.queue_bodies

    def counted(events: Any, *how: Any) -> Any:
        nonlocal commits
        commits += 1
        return queue(events, *how)

    h.running.forwarder.queue_bodies = counted  # type: ignore[method-assign]
    await h.cache_work(*(work_for(i + 1, a.name) for i, a in enumerate(agents)))
    for i, task in enumerate(waiting):
        status, body = await asyncio.wait_for(task, 5)
        assert (status, [e["execution_id"] for e in body["executions"]]) == (200, [i + 1])
    assert await h.reported(5)
    assert commits == 1  # their hop reports, together
    assert {e.via for e in h.ns.events_of("agent_pulled")} == {"long_poll"}
    assert len(h.ns.events_of("agent_pulled")) == 5


async def test_a_long_poll_whose_client_went_away_is_dropped_and_its_work_not_marked_pulled(
    long_polling: TaskServerHarness,
) -> None:
    h = long_polling
    agent = await h.register_agent("cem1", cem=True)
    gone = _long_poll(h, agent)
    await _waiting(h, "cem1")
    gone.cancel()  # the agent's request ends without an answer: its connection closes
    await wait_until(lambda: not h.running.long_polls.waiting("cem1"), what="the drop")
    assert h.running.metrics.long_polls_waiting._value.get() == 0
    await h.cache_work(work_for(1, "cem1"))
    assert await h.reported(5)
    assert not h.ns.events_of("agent_pulled")  # nobody was there to take it
    status, body = await asyncio.wait_for(h.call(agent, "GET", WAIT), 5)  # re-armed: at once
    assert (status, [e["execution_id"] for e in body["executions"]]) == (200, [1])
