"""The live run grid's stream (server-sent events) on a real NS: a run on 1,000 computers is a few
messages, each carrying every row that changed since the last, not one message per status event."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import insert, select

from tests.ns.conftest import ADMIN, Ns, event
from tests.ns.test_console_access import Browser
from tickle.ns.models import Computer, TaskServer

COMPUTERS = 1000


async def test_a_run_on_1000_computers_streams_batched_updates_until_done(ns: Ns) -> None:
    ts = await ns.task_server()
    names = [f"pc{i:04d}" for i in range(COMPUTERS)]
    with ns.stores.database.writing() as s:
        ts_id = s.scalar(select(TaskServer.id).where(TaskServer.name == ts.name))
        s.execute(
            insert(Computer),
            [{"name": n, "task_server_id": ts_id, "token_sha256": "x" * 64, "tickle_key": "k",
              "groups": [], "last_contact_at": time.time()} for n in names],
        )  # fmt: skip
    task = await ns.ok("POST", "/api/tasks", json={"name": "t", "command": ["true"]})
    run = await ns.ok("POST", "/api/runs", json={"task_id": task["id"], "computers": names})
    ids = {e["computer"]: e["id"] for e in run["executions"]}

    browser = Browser(ns, {})
    await browser.login(ADMIN)
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    messages: list[dict[str, Any]] = []
    async with ns.http.get(
        f"{ns.url}/console/runs/{run['id']}/events", headers={"Cookie": cookie}
    ) as stream:
        assert stream.status == 200
        assert stream.headers["Content-Type"].startswith("text/event-stream")
        lines = stream.content.__aiter__()
        messages.append(await _next_message(lines))
        assert len(messages[0]["rows"]) == COMPUTERS  # the whole grid first
        assert messages[0]["done"] is False

        t = time.time()
        for kind, fields in (
            ("started", {}),
            ("finished", {"status": "succeeded", "exit_code": 0}),
        ):
            batch = [event(ids[n], n, kind, t, **fields) for n in names]
            ack = await ts.ok("POST", "/api/ts/events", json={"events": batch})
            assert len(ack["accepted"]) == COMPUTERS
        while not messages[-1]["done"]:
            messages.append(await _next_message(lines))

    events = 2 * COMPUTERS
    later = messages[1:]
    assert len(later) <= 10, f"{len(later)} messages for {events} events"
    final: dict[int, str] = {}
    for message in messages:
        final.update((row["id"], row["status"]) for row in message["rows"])
    assert set(final.values()) == {"succeeded"}
    assert len(final) == COMPUTERS
    assert messages[-1]["counts"]["succeeded"] == COMPUTERS


async def _next_message(lines: Any) -> dict[str, Any]:
    async for raw in lines:
        line = raw.decode().strip()
        if line.startswith("data: "):
            return dict(json.loads(line[len("data: ") :]))
    raise AssertionError("the stream ended before a message")


async def test_the_stream_ends_when_its_session_logs_out(ns: Ns) -> None:
    ts = await ns.task_server()
    await ts.agent("c1")
    run = await ns.run_task(["c1"])
    browser = Browser(ns, {})
    await browser.login(ADMIN)
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    async with ns.http.get(
        f"{ns.url}/console/runs/{run['id']}/events", headers={"Cookie": cookie}
    ) as stream:
        lines = stream.content.__aiter__()
        first = await _next_message(lines)
        assert first["done"] is False  # pending: nothing will move it
        await browser.request("POST", "/console/logout", {"csrf": await browser.csrf()})
        rest = [raw.decode().strip() async for raw in lines]
    assert "event: ended" in rest


async def test_the_fleet_counts_stream_sends_a_change_of_state(ns: Ns) -> None:
    ts = await ns.task_server()
    await ts.agent("c1")
    await ts.agent("c2")
    browser = Browser(ns, {})
    await browser.login(ADMIN)
    cookie = "; ".join(f"{k}={v}" for k, v in browser.cookies.items())
    async with ns.http.get(f"{ns.url}/console/fleet/events", headers={"Cookie": cookie}) as stream:
        lines = stream.content.__aiter__()
        first = await _next_message(lines)
        assert (first["counts"]["all"], first["counts"]["reachable"]) == (2, 0)
        states = [{"name": "c1", "tickle_state": "reachable", "at": time.time()}]
        await ts.ok("POST", "/api/ts/computers/state", json=states)
        second = await _next_message(lines)
    assert (second["counts"]["reachable"], second["counts"]["all"]) == (1, 2)
