"""Cancels at the task server: what was cancelled is never handed out again, the agents holding it
are tickled and told at every pull until they report it ended — also after a restart."""

from __future__ import annotations

import time
import uuid

from tests.taskserver.conftest import TaskServerHarness, wait_until, work_for
from tickle.messages import StatusEvent


async def test_cancelled_work_is_dropped_told_to_its_agent_until_it_reports_and_kept_over_a_restart(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    other = await h.register_agent("pc2")
    h.ns.work = [work_for(7, "pc1"), work_for(8, "pc1"), work_for(9, "pc2")]
    h.send_tickle(h.ns.tickle())
    await wait_until(lambda: agent.socket.datagrams, what="pc1's tickle")
    status, body = await h.call(agent, "GET", "/api/agent/tasks", params={"via": "tickle"})
    assert [e["execution_id"] for e in body["executions"]] == [7, 8]
    assert body["cancel"] == []
    await wait_until(lambda: other.socket.datagrams, what="pc2's tickle")
    await h.call(other, "GET", "/api/agent/tasks", params={"via": "tickle"})
    tickles = len(agent.socket.datagrams)
    other_tickles = len(other.socket.datagrams)

    # the NS: 7 and 8 cancelled (8 never started there: no longer work; 7 runs: still work)
    h.ns.work = [work_for(7, "pc1"), work_for(9, "pc2")]
    h.ns.cancel = [7, 8]
    h.send_tickle(h.ns.tickle())
    await wait_until(
        lambda: len(agent.socket.datagrams) > tickles, what="pc1 tickled for its cancels"
    )
    status, body = await h.call(agent, "GET", "/api/agent/tasks", params={"via": "tickle"})
    assert status == 200
    assert body["executions"] == []  # 7 is cancelled: never handed out again
    assert body["cancel"] == [7, 8]
    assert len(other.socket.datagrams) == other_tickles  # pc2 holds nothing cancelled

    # the agent reports 7 stopped (and 8 never started): the cancels are done with
    ended = [
        StatusEvent(event_id=str(uuid.uuid4()), execution_id=eid, computer="pc1", kind="finished",
                    at=time.time(), status="cancelled").model_dump(mode="json")
        for eid in (7,)
    ]  # fmt: skip
    status, _ = await h.call(agent, "POST", "/api/agent/events", json={"events": ended})
    assert status == 200
    status, body = await h.call(agent, "GET", "/api/agent/tasks", params={"via": "poll"})
    assert (body["executions"], body["cancel"]) == ([], [8])

    # the NS stops listing the cancels; the task server still knows them after a restart
    h.ns.cancel = []
    h.pin_ports()
    await h.stop()
    pulls = h.ns.count("work")
    await h.start()
    await wait_until(lambda: h.ns.count("work") > pulls, what="the pull at start")
    status, body = await h.call(agent, "GET", "/api/agent/tasks", params={"via": "poll"})
    assert (body["executions"], body["cancel"]) == ([], [8])
