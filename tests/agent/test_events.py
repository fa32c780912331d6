"""The agent's status events reach its task server; one the task server refuses blocks nothing,
and a batch too large for it is sent again in parts."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from tickle.agent.control import control_call
from tickle.agent.settings import AgentSettings

from .conftest import eventually, running_agent, task
from .fake_ts import FakeTaskServer


@pytest.mark.timeout(60)
async def test_an_event_the_task_server_refuses_for_good_is_dropped_and_blocks_nothing(
    fake_ts: FakeTaskServer,
    settings_for: Callable[..., AgentSettings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    fake_ts.refuse_executions = {5}
    fake_ts.work[5] = task(5, ["true"])
    settings = settings_for(fake_ts)
    async with running_agent(settings) as agent:
        refused = await eventually(
            lambda: [
                r for r in caplog.records if r.levelname == "ERROR" and "refused" in r.message
            ],
            10.0,
            "the refused events logged as errors",
        )
        # later events still get through, at once (no backoff behind a batch retried forever)
        fake_ts.work[6] = task(6, ["true"])
        await control_call(settings.socket_path, "POST", "/check-now")
        finished = await eventually(lambda: fake_ts.events_of(6, "finished"), 10.0, "run 6")
        await eventually(lambda: agent.outbox.depth() == 0, 5.0, "the outbox drained")
    assert finished[0].status == "succeeded"
    assert fake_ts.events_of(5) == []
    assert all("execution_id=5 " in r.message for r in refused), [r.message for r in refused]


@pytest.mark.timeout(60)
async def test_a_batch_too_large_for_the_task_server_is_sent_again_in_parts(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    fake_ts.events_down = True  # the events of run 7 pile up in the outbox
    fake_ts.work[7] = task(7, ["true"])
    settings = settings_for(fake_ts)
    async with running_agent(settings) as agent:
        # both in one post that failed: none is on its way now (two posts may be in flight at
        # once, and one sent alone before the change below would be taken whole)
        await eventually(lambda: max(fake_ts.down_batches, default=0) >= 2, 10.0, "both posted")
        fake_ts.max_batch_events = 1  # back, but answering 413 to a batch of more than one
        fake_ts.events_down = False
        await eventually(lambda: agent.outbox.depth() == 0, 20.0, "the outbox drained")
    assert [e.kind for e in fake_ts.events_of(7)][-1] == "finished"
