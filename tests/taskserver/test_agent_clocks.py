"""The task server measures each agent's clock from its requests and flags one beyond the window."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.taskserver.conftest import Agent, TaskServerHarness, wait_until, work_for
from tickle import clock

SKEW_S = 60.0


async def _pull_at(h: TaskServerHarness, agent: Agent, at: float | str | None) -> Any:
    """The agent's poll, stamped with its time `at` (a string: sent as it is)."""
    headers = {"Authorization": f"Bearer {agent.token}"}
    if at is not None:
        headers[clock.TIME_HEADER] = at if isinstance(at, str) else clock.header_value(at)
    url = f"{h.url}/api/agent/tasks"
    async with h.http.get(url, headers=headers, params={"via": "poll"}) as resp:
        assert resp.status == 200, await resp.text()
        theirs = clock.parse_header(resp.headers.get(clock.TIME_HEADER), time.time())
        assert theirs == pytest.approx(time.time(), abs=1.0)  # the answer carries its time
        return await resp.json()


async def test_agent_60s_ahead_is_reported_clock_skewed_not_unreachable(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    ahead = await h.register_agent("pc1")
    for _ in range(3):
        await _pull_at(h, ahead, time.time() + SKEW_S)
    await wait_until(
        lambda: [s for s in h.ns.states if s.clock_offset_s is not None],
        what="the agent's clock offset at the NS",
    )
    (measured,) = [s for s in h.ns.states if s.clock_offset_s is not None]
    assert measured.clock_offset_s == pytest.approx(SKEW_S, abs=1.0)
    assert measured.tickle_state == "clock_skewed"
    metrics = h.running.metrics.registry
    assert metrics.get_sample_value("tickle_agents_clock_skewed") == 1
    largest = metrics.get_sample_value("tickle_agent_clock_offset_max_seconds")
    assert largest == pytest.approx(SKEW_S, abs=1.0)

    # its tickles go unanswered (it rejects them as stale): still clock_skewed, not unreachable
    h.ns.work = [work_for(1, "pc1")]
    h.send_tickle(h.ns.tickle())
    await wait_until(
        lambda: h.running.metrics.tickles_unreachable._value.get() == 1,
        what="the tickle to run out",
    )
    await wait_until(
        lambda: len([s for s in h.ns.states if s.tickle_state]) >= 2, what="the second state"
    )
    assert {s.tickle_state for s in h.ns.states if s.tickle_state} == {"clock_skewed"}


async def test_clock_back_in_the_window_ends_the_skewed_state(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    await _pull_at(h, agent, time.time() + SKEW_S)
    for _ in range(5):  # the clock was set right: the median follows after a few requests
        await _pull_at(h, agent, time.time())
    await wait_until(
        lambda: [s for s in h.ns.states if s.tickle_state == "unknown"],
        what="the state to go back to unknown",
    )
    assert h.running.metrics.registry.get_sample_value("tickle_agents_clock_skewed") == 0
    assert h.running.agent_clocks.offset("pc1") == pytest.approx(0.0, abs=1.0)


async def test_a_skewed_cem_agent_gets_an_offset_but_no_tickle_state(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    laptop = await h.register_agent("laptop1", cem=True)
    await _pull_at(h, laptop, time.time() - SKEW_S)
    await wait_until(
        lambda: [s for s in h.ns.states if s.clock_offset_s is not None], what="the offset"
    )
    (measured,) = [s for s in h.ns.states if s.clock_offset_s is not None]
    assert measured.clock_offset_s == pytest.approx(-SKEW_S, abs=1.0)
    assert measured.tickle_state is None  # a CEM agent is never tickled: its state stays cem


@pytest.mark.parametrize("header", [None, "noon", "nan", "1e300"])
async def test_a_request_without_a_sane_time_is_served_and_measures_nothing(
    task_server: TaskServerHarness, header: str | None
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    await _pull_at(h, agent, header)
    assert h.running.agent_clocks.offset("pc1") is None


async def test_requests_held_up_in_a_busy_queue_are_not_taken_for_a_clock_behind(
    task_server: TaskServerHarness,
) -> None:
    # S2 at 10,000 agents: the agents' pulls waited seconds in the task servers' accept queues;
    # their one-way samples (the agent's time against the arrival) were the delay, the median of
    # them a clock 2 s behind, and the NS moved the agents' steps of every timeline 2 s later
    h = task_server
    agent = await h.register_agent("pc1")
    for held_up_s in (3.1, 2.8, 0.0, 4.0, 3.3):  # requests stamped when sent, served this late
        await _pull_at(h, agent, time.time() - held_up_s)
    offset = h.running.agent_clocks.offset("pc1")
    assert offset == pytest.approx(0.0, abs=0.5), "the least delayed request tells the clock"
    assert not [s for s in h.ns.states if s.tickle_state == "clock_skewed"]
