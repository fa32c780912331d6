"""Many agents at once: each request is answered for the agent whose token it carries."""

from __future__ import annotations

import asyncio

from tests.taskserver.conftest import TaskServerHarness, work_for


async def test_concurrent_pulls_each_get_their_own_agents_work(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agents = [await h.register_agent(f"pc{i:02d}") for i in range(30)]
    await h.cache_work(*(work_for(100 + i, a.name) for i, a in enumerate(agents)))

    async def pull(i: int) -> tuple[int, int, list[int]]:
        status, body = await h.call(agents[i], "GET", "/api/agent/tasks?via=poll")
        return i, status, [w["execution_id"] for w in body["executions"]]

    answers = await asyncio.gather(*(pull(i % 30) for i in range(300)))
    for i, status, executions in answers:
        assert status == 200
        assert executions == [100 + i], f"agent {i} was answered with another agent's work"
