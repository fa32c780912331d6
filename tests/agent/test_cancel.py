"""The agent and cancels and expiry: what was cancelled or expired never starts; what runs is
stopped with its processes and reported `cancelled` once."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tickle.agent.settings import AgentSettings

from .conftest import eventually, running_agent, script
from .fake_ts import FakeTaskServer


async def test_cancelled_or_expired_work_is_reported_and_never_started(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings], tmp_path: Path
) -> None:
    ran = tmp_path / "ran"
    async with running_agent(settings_for(fake_ts)) as agent:
        fake_ts.work[1] = script(1, f"touch {ran}-1")
        fake_ts.work[2] = script(2, f"touch {ran}-2").model_copy(
            update={"expires_at": time.time() - 1}
        )
        fake_ts.cancel = [1, 3]  # 3: cancelled before this agent ever saw it
        result = await agent.check_now()
        assert result["started"] == []
        await eventually(lambda: len(fake_ts.events) >= 3, within_s=10.0, what="three reports")
        # a later pull repeating the cancels changes nothing
        assert (await agent.check_now())["started"] == []
        assert await agent.forwarder.drained(5)
    assert [(e.execution_id, e.kind, e.status) for e in fake_ts.events] == [
        (1, "finished", "cancelled"),
        (3, "finished", "cancelled"),
        (2, "finished", "expired"),
    ]
    assert not list(tmp_path.glob("ran-*"))


async def test_a_running_execution_cancelled_is_stopped_and_reported_cancelled_once(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    async with running_agent(settings_for(fake_ts, task_kill_grace_s=0.5)) as agent:
        fake_ts.work[5] = script(5, "echo begun; exec sleep 60")
        assert (await agent.check_now())["started"] == [5]
        await eventually(lambda: fake_ts.events_of(5, "started"), within_s=10.0, what="started")
        began = time.monotonic()
        fake_ts.cancel = [5]
        await agent.check_now()
        await agent.check_now()  # the cancel repeated while it stops
        await eventually(lambda: fake_ts.events_of(5, "finished"), within_s=10.0, what="finish")
        took = time.monotonic() - began
        await agent.check_now()
        assert await agent.forwarder.drained(5)
        assert agent.poller.running == []
    [finished] = fake_ts.events_of(5, "finished")
    assert finished.status == "cancelled"
    assert "cancelled by the operator" in (finished.output_tail or "")
    assert took < 10
