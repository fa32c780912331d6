"""What the task server measures counts each thing once, however often an agent retries."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from typing import Any

from tests.taskserver.conftest import TaskServerHarness, wait_until, work_for
from tickle.messages import StatusEvent


def _events(computer: str, execution_id: int) -> list[dict[str, object]]:
    started = {"kind": "started"}
    finished = {"kind": "finished", "status": "succeeded", "exit_code": 0}
    return [
        StatusEvent.model_validate(
            {"event_id": str(uuid.uuid4()), "execution_id": execution_id,
             "computer": computer, "at": 1.0, **extra}
        ).model_dump(mode="json")
        for extra in (started, finished)
    ]  # fmt: skip


async def test_a_retried_event_post_counts_and_forwards_each_event_once(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    await h.cache_work(work_for(1, "pc1"))
    batch = {"events": _events("pc1", 1)}
    metrics = h.running.metrics

    status, body = await h.call(agent, "POST", "/api/agent/events", json=batch)
    assert (status, len(body["accepted"])) == (200, 2)
    # the agent's post timed out although served: it posts the same events again, once while
    # they wait in the outbox and once after they were forwarded
    status, body = await h.call(agent, "POST", "/api/agent/events", json=batch)
    assert (status, len(body["accepted"])) == (200, 2)  # the agent may drop its copies
    await wait_until(lambda: h.ns.events_of("finished"), what="the finished event at the NS")
    assert await h.reported(5)
    posts = h.ns.count("events")
    status, body = await h.call(agent, "POST", "/api/agent/events", json=batch)
    assert (status, len(body["accepted"])) == (200, 2)
    assert await h.reported(5)
    assert h.ns.count("events") == posts, "events already forwarded were forwarded again"

    assert metrics.status_events.labels(kind="started")._value.get() == 1
    assert metrics.status_events.labels(kind="finished")._value.get() == 1
    assert metrics.executions.labels(status="succeeded")._value.get() == 1


async def test_pulls_served_together_share_one_commit_and_report_each_hop_once(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agents = [await h.register_agent(f"pc{i}") for i in range(20)]
    await h.cache_work(*(work_for(i + 1, f"pc{i}") for i in range(20)))
    await h.reported(5)
    commits = 0
    queue = h.running.forwarder.queue_bodies

    def counting_queue(events: Iterable[tuple[str, str]], *how: Any) -> list[str]:
        nonlocal commits
        commits += 1
        return queue(events, *how)

    h.running.forwarder.queue_bodies = counting_queue  # type: ignore[method-assign]
    # every agent pulls at once, the first one twice
    answers = await asyncio.gather(
        *(
            h.call(a, "GET", "/api/agent/tasks", params={"via": "poll"})
            for a in [*agents, agents[0]]
        )
    )
    assert [body["executions"][0]["execution_id"] for _, body in answers] == [
        *range(1, 21), 1,
    ]  # fmt: skip
    assert commits < 20, "every pull committed on its own"
    await wait_until(lambda: len(h.ns.events_of("agent_pulled")) >= 20, what="agent_pulled")
    assert await h.reported(5)
    pulled = sorted(e.execution_id for e in h.ns.events_of("agent_pulled"))
    assert pulled == list(range(1, 21))  # once each, the double pull too
    assert h.running.metrics.status_events.labels(kind="agent_pulled")._value.get() == 20


async def test_events_are_forwarded_to_the_ns_in_batches_of_500(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    # executions this task server does not hold: accepted and left to the NS
    events = [e for i in range(300) for e in _events("pc1", 1000 + i)]
    status, body = await h.call(agent, "POST", "/api/agent/events", json={"events": events})
    assert (status, len(body["accepted"])) == (200, 600)
    assert await h.reported(5)
    assert len(h.ns.events) == 600
    assert h.ns.count("events") == 2  # 500 + 100: the NS records a post in one transaction
