"""Status events on PostgreSQL shared by two NS processes: recorded exactly once by event id, even
when the same batch reaches both processes at the same moment (a task server retrying through a
load balancer)."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import metric
from tickle import messages as m

from .conftest import PgServer, TwoNsFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
COMPUTERS = 20


async def call(
    http: aiohttp.ClientSession,
    url: str,
    token: str | None,
    method: str,
    path: str,
    body: Any = None,
) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.request(method, url + path, json=body, headers=headers) as resp:
        payload = await resp.json()
        assert resp.status < 300, (resp.status, payload)
        return payload


def batch_for(work: m.ExecutionWork, now: float) -> m.EventBatch:
    """What a task server forwards for one execution: its pull, the agent's start and finish."""
    fields: list[dict[str, Any]] = [
        {"kind": "agent_pulled", "via": "tickle"},
        {"kind": "started"},
        {"kind": "finished", "exit_code": 0, "status": "succeeded", "output_tail": "ok"},
    ]
    return m.EventBatch(
        events=[
            m.StatusEvent.model_validate(
                {
                    "event_id": str(uuid.uuid4()),
                    "execution_id": work.execution_id,
                    "computer": work.computer,
                    "at": now + i * 0.01,
                    "cached_at": now + 0.05,
                    **f,
                }
            )
            for i, f in enumerate(fields)
        ]
    )


async def test_same_event_batch_sent_to_both_ns_processes_is_recorded_once(
    two_ns_fleet: TwoNsFactory, postgres: PgServer
) -> None:
    two = await two_ns_fleet([], [])
    ns1, ns2, admin = two.fleet.ns_url, two.ns2.url, two.fleet.admin_token
    db = two.database_url.rsplit("/", 1)[1]
    async with aiohttp.ClientSession() as http:
        # play a task server: register at one process, report and pull at the other
        register = {
            "enrollment_secret": two.fleet.enrollment_secret,
            "name": "fake-ts",
            "tickle_host": "127.0.0.1",
            "tickle_port": 9,
            "api_url": "http://127.0.0.1:9",
        }
        creds = m.TaskServerCredentials.model_validate(
            await call(http, ns1, None, "POST", "/api/ts/register", register)
        )
        assert base64.b64decode(creds.tickle_key)
        names = [f"c{i}" for i in range(COMPUTERS)]
        for name in names:
            await call(http, ns2, creds.token, "POST", "/api/ts/agents/register",
                       {"name": name, "tickle_host": "127.0.0.1", "tickle_port": 9})  # fmt: skip
        task = await call(
            http, ns1, admin, "POST", "/api/tasks", {"name": "t", "command": ["true"]}
        )
        await call(
            http, ns2, admin, "POST", "/api/runs", {"task_id": task["id"], "computers": names}
        )
        work = m.WorkOut.model_validate(await call(http, ns2, creds.token, "GET", "/api/ts/work"))
        assert len(work.executions) == COMPUTERS

        batches = [batch_for(w, time.time()) for w in work.executions]
        acks = await asyncio.gather(
            *(
                call(http, url, creds.token, "POST", "/api/ts/events", b.model_dump(mode="json"))
                for b in batches
                for url in (ns1, ns2)
            )
        )
        runs = await call(http, ns1, admin, "GET", "/api/runs/1")

    sent = [e.event_id for b in batches for e in b.events]
    for i, ack in enumerate(acks):  # each process answers that every event of its batch is in
        assert sorted(ack["accepted"]) == sorted(e.event_id for e in batches[i // 2].events)
    with postgres.connect(db) as conn:
        rows = conn.execute("SELECT event_id, count(*) FROM status_events GROUP BY event_id")
        recorded = {str(eid): int(n) for eid, n in rows.fetchall()}
    assert recorded == dict.fromkeys(sent, 1)
    assert {e["status"] for e in runs["executions"]} == {"succeeded"}
    # each finish counted once across both processes
    finished = [await metric(u, "tickle_executions_total", status="succeeded") for u in (ns1, ns2)]
    latencies = [await metric(u, "tickle_run_now_to_recorded_seconds_count") for u in (ns1, ns2)]
    events = [await metric(u, "tickle_status_events_total") for u in (ns1, ns2)]
    assert sum(finished) == COMPUTERS, finished
    assert sum(latencies) == COMPUTERS, latencies
    assert sum(events) == len(sent), events
