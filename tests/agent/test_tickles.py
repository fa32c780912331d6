"""A tickle makes the agent pull from its task server at once; nothing else does anything."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tickle import agentapi, wire
from tickle.agent.service import Agent
from tickle.agent.settings import AgentSettings
from tickle.agentapi import AgentPolicy

from .conftest import eventually, running_agent, script, task, tickle_sender
from .fake_ts import FakeTaskServer

pytestmark = pytest.mark.timeout(30)


def rejected(agent: object, reason: str) -> float:
    value = agent.metrics.registry.get_sample_value(  # type: ignore[attr-defined]
        "tickle_tickles_rejected_total", {"reason": reason}
    )
    return float(value or 0.0)


async def test_valid_tickle_causes_immediate_pull_and_task_runs(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    async with running_agent(settings_for(fake_ts)) as agent:
        before = time.time()
        fake_ts.work[7] = task(7, ["sh", "-c", "echo hello"])
        with tickle_sender(agent, fake_ts) as sender:
            sender.tickle()
            pull = (await eventually(lambda: fake_ts.pulls("tickle"), what="pull"))[0]
            finished = await eventually(lambda: fake_ts.events_of(7, "finished"), what="finish")
        assert pull.at - before < 1.0
        assert finished[0].status == "succeeded"
        assert finished[0].output_tail == "hello\n"
        assert fake_ts.events_of(7, "started")[0].via == "tickle"
        # the tickle caused one tasks pull and nothing else (events are the run's report)
        assert [r for r in fake_ts.routes(since=before) if r != "events"] == ["tasks"]


async def test_tickle_carries_no_task_nothing_runs_without_pulled_work(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings], tmp_path: Path
) -> None:
    async with running_agent(settings_for(fake_ts)) as agent:
        with tickle_sender(agent, fake_ts) as sender:
            sender.tickle()
            await eventually(lambda: fake_ts.pulls("tickle"), what="pull")
            await agent.forwarder.drained(2.0)
        assert agent.state.counts() == {}
        assert fake_ts.events == []

        # work appears on the task server: it runs only once the pull has returned it
        fake_ts.work[8] = task(8, ["true"])
        with tickle_sender(agent, fake_ts) as sender:
            sender.tickle()
            started = await eventually(lambda: fake_ts.events_of(8, "started"), what="start")
        answered = [p.answered_at for p in fake_ts.pulls("tickle") if p.answered_at]
        assert started[0].at >= min(a for a in answered[1:])


def _forged(s: object) -> list[bytes]:
    return [s.datagram(key=b"x" * 32)]  # type: ignore[attr-defined]


def _altered(s: object) -> list[bytes]:
    data = bytearray(s.datagram())  # type: ignore[attr-defined]
    data[-40] ^= 0x01  # a bit of the seq/time field: the MAC no longer matches
    return [bytes(data)]


def _stale(s: object) -> list[bytes]:
    return [s.datagram(sent_at_ms=int((time.time() - 120) * 1000))]  # type: ignore[attr-defined]


def _malformed(s: object) -> list[bytes]:
    return [b"TKL\x01garbage", b"", b"\x00" * 600]


def _unknown_sender(s: object) -> list[bytes]:
    return [s.datagram(sender="mallory")]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("make", "reason", "count"),
    [
        (_forged, "bad_mac", 1),
        (_altered, "bad_mac", 1),
        (_stale, "stale", 1),
        (_malformed, "malformed", 3),
        (_unknown_sender, "unknown_sender", 1),
    ],
    ids=["forged", "altered", "stale", "malformed", "unknown_sender"],
)
async def test_rejected_tickle_causes_no_pull(
    fake_ts: FakeTaskServer,
    settings_for: Callable[..., AgentSettings],
    make: Callable[[object], list[bytes]],
    reason: str,
    count: int,
) -> None:
    fake_ts.work[9] = task(9, ["true"])
    fake_ts.keep_serving = True
    async with running_agent(settings_for(fake_ts)) as agent:
        start_pulls = len(fake_ts.pulls())
        with tickle_sender(agent, fake_ts) as sender:
            for data in make(sender):
                sender.send(data)
            await eventually(lambda: rejected(agent, reason) >= count, what=f"{reason} counted")
            # a valid tickle after the bad ones: its pull is the only one
            sender.tickle()
            await eventually(lambda: fake_ts.pulls("tickle"), what="valid pull")
        assert rejected(agent, reason) == count
        assert len(fake_ts.pulls()) == start_pulls + 1


async def test_replayed_tickle_causes_no_second_pull(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    async with running_agent(settings_for(fake_ts)) as agent:
        with tickle_sender(agent, fake_ts) as sender:
            first = sender.tickle()
            await eventually(lambda: len(fake_ts.pulls("tickle")) == 1, what="first pull")
            sender.send(first)
            await eventually(lambda: rejected(agent, "replayed") == 1, what="replay counted")
            sender.tickle()
            await eventually(lambda: len(fake_ts.pulls("tickle")) == 2, what="second pull")
        assert len(fake_ts.pulls("tickle")) == 2


async def test_replayed_tickle_is_rejected_after_the_agent_restarts(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    settings = settings_for(fake_ts)  # the same state dir and tickle port for both runs
    async with running_agent(settings) as agent:
        with tickle_sender(agent, fake_ts) as sender:
            captured = sender.tickle()
            await eventually(lambda: len(fake_ts.pulls("tickle")) == 1, what="the tickled pull")
    async with running_agent(settings) as agent:
        with tickle_sender(agent, fake_ts) as sender:
            sender.send(captured)
            await eventually(lambda: rejected(agent, "replayed") == 1, what="replay counted")
        # a restarted task server: a new sender whose sequence starts anew, higher
        with tickle_sender(agent, fake_ts) as restarted:
            restarted.tickle()
            await eventually(lambda: len(fake_ts.pulls("tickle")) == 2, what="the new pull")
    assert len(fake_ts.pulls("tickle")) == 2


async def test_settings_tickle_refreshes_policy_without_pulling_tasks(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    async with running_agent(settings_for(fake_ts)) as agent:
        since = time.time()
        fake_ts.policy = fake_ts.policy.model_copy(
            update={"settings_version": 2, "task_request_interval_s": 600}
        )
        with tickle_sender(agent, fake_ts) as sender:
            sender.tickle(wire.Kind.SETTINGS)
            await eventually(lambda: agent.poller.policy.settings_version == 2, what="policy")
        assert fake_ts.routes(since=since) == ["policy"]
        assert agent.state.policy() == agentapi.decode(
            fake_ts.policy.model_dump_json(), AgentPolicy
        )


async def test_tickle_and_poll_race_runs_execution_once(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings], tmp_path: Path
) -> None:
    marker = tmp_path / "runs"
    async with running_agent(settings_for(fake_ts)) as agent:
        # hold every pull until two are waiting, so both answers carry execution 7
        waiting: list[asyncio.Future[None]] = []

        def gate() -> asyncio.Future[None]:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiting.append(fut)
            if len(waiting) == 2:
                for f in waiting:
                    f.set_result(None)
            return fut

        fake_ts.pull_gate = gate
        fake_ts.keep_serving = True
        fake_ts.work[7] = script(7, f"echo ran >> {marker}")
        with tickle_sender(agent, fake_ts) as sender:
            sender.tickle()
            poll = asyncio.create_task(agent.poller.pull("poll"))
            result = await poll
            await eventually(lambda: fake_ts.events_of(7, "finished"), what="finished")
        assert {p.via for p in fake_ts.pulls()[-2:]} == {"tickle", "poll"}
        assert 7 in result.executions
        assert marker.read_text() == "ran\n"
        assert len(fake_ts.events_of(7, "started")) == 1


async def test_agent_60s_ahead_says_once_that_its_clock_is_off_when_it_rejects_stale_tickles(
    fake_ts: FakeTaskServer,
    settings_for: Callable[..., AgentSettings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent = Agent(settings_for(fake_ts), wall_clock=lambda: time.time() + 60)
    try:
        await agent.start()
        # measured from the fake task server's answers (its time on each)
        assert agent.status()["clock_offset_s"] == pytest.approx(60, abs=1)
        with (
            caplog.at_level(logging.WARNING, logger="tickle.agent.service"),
            tickle_sender(agent, fake_ts) as sender,
        ):
            for _ in range(3):
                sender.tickle()  # fresh by the task server's clock: stale by the agent's
            await eventually(lambda: rejected(agent, "stale") == 3, what="3 stale tickles")
    finally:
        await agent.stop()
    lines = [r.getMessage() for r in caplog.records if "clock is" in r.getMessage()]
    assert len(lines) == 1, lines  # once, not per tickle
    assert "this computer's clock is +60." in lines[0]
    assert "set the clock right" in lines[0]
    assert fake_ts.pulls("tickle") == []
