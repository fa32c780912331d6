"""The agent's long-poll: held while its policy says so, work taken at once, every loop bounded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from tickle.agent.settings import AgentSettings

from .conftest import eventually, running_agent, task
from .fake_ts import FakeTaskServer

pytestmark = pytest.mark.timeout(60)


def _long_poll_policy(fake: FakeTaskServer, on: bool = True) -> None:
    fake.policy = fake.policy.model_copy(
        update={"cem": True, "long_poll": on, "long_poll_timeout_s": 30}
    )


async def test_cem_agent_takes_work_from_its_long_poll_at_once_and_rearms(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    _long_poll_policy(fake_ts)
    fake_ts.long_poll_hold_s = 30.0
    async with running_agent(settings_for(fake_ts, cem=True)) as agent:
        assert agent.listener is None  # CEM: no UDP socket at all
        await eventually(lambda: fake_ts.routes().count("wait") == 1, what="the long-poll")
        assert agent.poller.long_polling
        fake_ts.work[11] = task(11, ["true"])
        released = time.time()
        fake_ts.long_poll_release.set()
        started = await eventually(lambda: fake_ts.events_of(11, "started"), within_s=5.0)
        assert started[0].via == "long_poll"
        assert started[0].at - released < 1.0
        # re-armed after a short pause
        await eventually(lambda: fake_ts.routes().count("wait") == 2, what="the next long-poll")
        fake_ts.long_poll_release.set()  # the fake task server's stop does not wait for it
    assert [c.via for c in fake_ts.pulls()] == ["poll"]  # only the pull at start


async def test_failing_long_polls_back_off_and_empty_ones_rearm_with_a_pause(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    _long_poll_policy(fake_ts)
    fake_ts.long_poll_status = 503
    async with running_agent(settings_for(fake_ts, cem=True)) as agent:
        await asyncio.sleep(3.0)  # the window observed: no event marks "not calling"
        refused = fake_ts.routes().count("wait")
        # each try at a random moment of a 20 s window: a few in 3 s, never a tight loop
        assert 1 <= refused <= 4, refused
        assert agent.poller.long_poll_failures >= 1
        fake_ts.long_poll_status = 200  # answered empty at once: re-armed 0.05..0.5 s later
        await eventually(lambda: agent.poller.long_poll_failures == 0, within_s=30)
        since = time.time()
        await asyncio.sleep(2.0)
        empty = len(fake_ts.routes(since=since))
        assert 2 <= empty <= 41, empty


async def test_a_long_poll_refused_busy_is_tried_again_no_sooner_than_retry_after(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    _long_poll_policy(fake_ts)
    fake_ts.long_poll_status, fake_ts.long_poll_retry_after = 503, "3"
    async with running_agent(settings_for(fake_ts, cem=True)):
        await eventually(lambda: fake_ts.routes().count("wait") == 2, within_s=30,
                         what="the long-poll tried again")  # fmt: skip
    first, second = [c.at for c in fake_ts.calls if c.route == "wait"][:2]
    # its own backoff alone could try again at once (anywhere in its 20 s window)
    assert second - first >= 3.0, second - first


async def test_no_long_poll_while_the_policy_says_off(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    _long_poll_policy(fake_ts, on=False)
    async with running_agent(settings_for(fake_ts, cem=True)) as agent:
        assert not agent.poller.long_polling
        _long_poll_policy(fake_ts, on=True)
        fake_ts.policy = fake_ts.policy.model_copy(update={"settings_version": 2})
        await agent.policy_refresh()
        await eventually(lambda: "wait" in fake_ts.routes(), what="the long-poll once on")
        fake_ts.policy = fake_ts.policy.model_copy(
            update={"long_poll": False, "settings_version": 3}
        )
        await agent.policy_refresh()
        assert not agent.poller.long_polling


async def test_a_cem_agent_behind_a_gateway_holds_its_long_poll_there(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    # the task server's own URL is not listening: only the gateway (the fake here) is reachable
    _long_poll_policy(fake_ts)
    fake_ts.long_poll_hold_s = 30.0
    settings = settings_for(
        fake_ts, cem=True, gateway_url=fake_ts.url, task_servers=["http://127.0.0.1:9"]
    )
    async with running_agent(settings) as agent:
        await eventually(lambda: fake_ts.routes().count("wait") == 1, what="the long-poll")
        assert agent.poller.long_polling
        fake_ts.work[12] = task(12, ["true"])
        fake_ts.long_poll_release.set()
        finished = await eventually(lambda: fake_ts.events_of(12, "finished"), within_s=5.0)
        await eventually(lambda: fake_ts.routes().count("wait") == 2, what="the next long-poll")
        fake_ts.long_poll_release.set()
    assert finished[0].status == "succeeded"
    assert fake_ts.events_of(12, "started")[0].via == "long_poll"
