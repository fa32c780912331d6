"""The task server API's request limits: an agent's large body is read only with its token."""

from __future__ import annotations

import uuid

from tests.taskserver.conftest import AGENT_SECRET, TaskServerHarness
from tickle.messages import StatusEvent


def _batch(events: int) -> dict[str, object]:
    """Events with 4,000-character output tails: 10 are past the 16 KiB of a request without
    credentials."""
    return {
        "events": [
            StatusEvent(
                event_id=str(uuid.uuid4()), execution_id=1, computer="pc1", kind="started",
                at=1.0, output_tail="x" * 4000,
            ).model_dump(mode="json")
            for _ in range(events)
        ]
    }  # fmt: skip


async def test_an_agents_large_event_batch_is_read_with_its_token_only(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    batch = _batch(10)

    status, _ = await h.call(agent, "POST", "/api/agent/events", json=batch)
    assert status == 200
    status, body = await h.call(None, "POST", "/api/agent/events", json=batch)
    assert (status, body["detail"]) == (
        413,
        "request body over the 16384-byte limit without credentials",
    )
    agent.token = "not-a-token-0123456789"
    status, _ = await h.call(agent, "POST", "/api/agent/events", json=batch)
    assert status == 401  # as the route answers: the agent registers again


async def test_an_agent_registration_is_held_to_the_small_limit(
    task_server: TaskServerHarness,
) -> None:
    body = {"enrollment_secret": AGENT_SECRET, "name": "pc1", "groups": ["g" * 60] * 300}
    status, answer = await task_server.call(None, "POST", "/api/agent/register", json=body)
    assert (status, answer["detail"]) == (
        413,
        "request body over the 16384-byte limit of registrations",
    )
