"""The bench's simulated agent behaves as the real one where the bench's figures depend on it."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from tickle.testing.simagents import SimAgent

from .conftest import TickleSender, eventually, free_udp_port, task
from .fake_ts import FakeTaskServer


@pytest.mark.timeout(60)
async def test_a_tickle_while_its_events_are_being_posted_is_pulled_at_once(
    fake_ts: FakeTaskServer,
) -> None:
    # as the real agent (its executions and outbox post apart from its pulls): a task server
    # holding the events while pulls are due (pulls_first_s) must get the pull it waits for
    fake_ts.events_gate = asyncio.Event()
    port = free_udp_port()
    sim = SimAgent("agent1", "127.0.0.1", fake_ts.url, Counter(), tickle_port=port)
    await sim.start(fake_ts.secret)
    sender = TickleSender(("127.0.0.1", port), fake_ts.name, fake_ts.key)
    try:
        fake_ts.work[1] = task(1, ["true"])
        sender.tickle()
        await eventually(lambda: fake_ts.routes().count("events") == 1, what="the first post")
        fake_ts.work[2] = task(2, ["true"])
        sender.tickle()
        await eventually(lambda: len(fake_ts.pulls()) == 2, what="the second pull")
        assert not fake_ts.events  # the first post still held
        fake_ts.events_gate.set()
        await eventually(
            lambda: (
                {(e.execution_id, e.kind) for e in fake_ts.events}
                == {(1, "started"), (1, "finished"), (2, "started"), (2, "finished")}
            ),
            what="both executions' events",
        )
    finally:
        fake_ts.events_gate.set()
        sender.close()
        await sim.close()
