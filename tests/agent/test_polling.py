"""Without tickles the agent polls every Task Request Interval (from the policy), with jitter."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import msgspec
import pytest

from tickle.agent.control import control_call
from tickle.agent.poller import poll_delay
from tickle.agent.settings import AgentSettings
from tickle.messages import AgentPolicy

from .conftest import eventually, running_agent, task
from .fake_ts import FakeTaskServer


@pytest.mark.timeout(60)
async def test_agent_polls_every_interval_with_jitter_from_policy(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    # registration hands down 1800 s; the first pull's policy says 2 s: the timer is re-armed
    async with running_agent(settings_for(fake_ts)) as agent:
        assert agent.poller.policy.task_request_interval_s == 1800
        fake_ts.policy = fake_ts.policy.model_copy(
            update={
                "settings_version": 2,
                "task_request_interval_s": 2,
                "poll_jitter_fraction": 0.25,
            }
        )
        await agent.policy_refresh()
        armed_at = time.time()
        polls = await eventually(
            lambda: (p := fake_ts.pulls("poll", since=armed_at)) and len(p) >= 4 and p,
            within_s=15.0, what="four polls",
        )  # fmt: skip
    times = [armed_at] + [p.at for p in polls[:4]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(1.5 - 0.05 <= g <= 2.5 + 0.25 for g in gaps), gaps
    assert max(gaps) - min(gaps) > 0.01, f"no jitter: {gaps}"
    assert fake_ts.routes(since=armed_at).count("policy") == 0


def test_poll_delay_is_uniform_within_jitter_fraction() -> None:
    policy = AgentPolicy(
        settings_version=1, task_request_interval_s=100, poll_jitter_fraction=0.1, cem=False
    )
    delays = [poll_delay(policy) for _ in range(2000)]
    assert 90.0 <= min(delays) < 91.0
    assert 109.0 < max(delays) <= 110.0


async def test_work_arrives_by_polling_when_no_tickle_comes(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    fake_ts.policy = fake_ts.policy.model_copy(update={"task_request_interval_s": 2})
    async with running_agent(settings_for(fake_ts)):
        fake_ts.work[11] = task(11, ["true"])
        started = await eventually(lambda: fake_ts.events_of(11, "started"), within_s=5.0)
    assert started[0].via == "poll"
    assert fake_ts.pulls("tickle") == []


async def test_policy_refresh_via_control_socket_does_not_fetch_tasks(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    settings = settings_for(fake_ts)
    async with running_agent(settings) as agent:
        fake_ts.work[12] = task(12, ["true"])
        fake_ts.policy = fake_ts.policy.model_copy(
            update={"settings_version": 5, "task_request_interval_s": 900}
        )
        since = time.time()
        answer = await control_call(settings.socket_path, "POST", "/policy-refresh")
        assert answer["policy"]["settings_version"] == 5
        assert agent.poller.policy.task_request_interval_s == 900
        assert fake_ts.routes(since=since) == ["policy"]
        assert agent.state.counts() == {}


async def test_check_now_via_control_socket_pulls_and_runs(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    settings = settings_for(fake_ts)
    async with running_agent(settings):
        fake_ts.work[13] = task(13, ["true"])
        since = time.time()
        answer = await control_call(settings.socket_path, "POST", "/check-now")
        assert answer == {"via": "check_now", "executions": [13], "started": [13]}
        assert [p.via for p in fake_ts.pulls(since=since)] == ["check_now"]
        finished = await eventually(lambda: fake_ts.events_of(13, "finished"))
        assert finished[0].status == "succeeded"
        status = await control_call(settings.socket_path, "GET", "/status")
    assert status["name"] == "agent1"
    assert status["task_server"] == "ts1"
    assert status["cem"] is False
    assert status["last_pull_at"] >= since
    assert status["policy"]["task_request_interval_s"] == 1800


async def test_every_call_tells_the_task_server_the_settings_version_the_agent_has(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    settings = settings_for(fake_ts)
    async with running_agent(settings) as agent:
        fake_ts.work[14] = task(14, ["true"])
        await control_call(settings.socket_path, "POST", "/check-now")
        await eventually(lambda: fake_ts.events_of(14, "finished"))
        fake_ts.policy = fake_ts.policy.model_copy(update={"settings_version": 5})
        await agent.policy_refresh()  # asks with version 1, takes 5
        since = time.time()
        await control_call(settings.socket_path, "POST", "/check-now")
    calls = [c for c in fake_ts.calls if c.route in ("tasks", "policy", "events")]
    assert all(c.settings_version is not None for c in calls), calls
    assert {c.route for c in calls} == {"tasks", "policy", "events"}
    assert [c.settings_version for c in fake_ts.pulls(since=since)] == ["5"]


async def test_control_socket_is_private_and_serves_metrics(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    import aiohttp

    settings = settings_for(fake_ts)
    async with running_agent(settings):
        assert settings.socket_path.stat().st_mode & 0o777 == 0o600
        connector = aiohttp.UnixConnector(path=str(settings.socket_path))
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.get("http://agent/metrics") as resp,
        ):
            text = await resp.text()
    assert 'tickle_pulls_total{via="poll"} 1.0' in text
    assert not settings.socket_path.exists()


async def test_failed_pull_makes_the_next_poll_come_sooner(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    settings = settings_for(fake_ts)
    async with running_agent(settings) as agent:
        fake_ts.revoke_tokens()
        fake_ts.secret = "changed"  # re-registration fails too: the pull fails
        await agent.poller.pull_quietly("tickle")
        assert agent.poller.last_error is not None
        agent.poller.apply_policy(msgspec.structs.replace(agent.poller.policy, settings_version=9))
        await eventually(lambda: agent.poller.next_poll_at, what="re-armed timer")
        await eventually(
            lambda: agent.poller.next_poll_at and agent.poller.next_poll_at - time.time() < 10,
            what="a retry sooner than the 1800 s interval",
        )  # fmt: skip


async def test_cli_control_command_prints_status_and_fails_without_agent(
    fake_ts: FakeTaskServer,
    settings_for: Callable[..., AgentSettings],
    capsys: pytest.CaptureFixture[str],
) -> None:
    import asyncio
    import json

    from tickle.agent.control import run_control_command

    settings = settings_for(fake_ts)
    args = ["--control-socket", str(settings.socket_path)]
    async with running_agent(settings):
        rc = await asyncio.to_thread(run_control_command, args, "status")
    out, _ = capsys.readouterr()
    assert rc == 0
    assert json.loads(out)["name"] == "agent1"
    assert await asyncio.to_thread(run_control_command, args, "status") == 1
    assert "cannot reach the agent" in capsys.readouterr().err
