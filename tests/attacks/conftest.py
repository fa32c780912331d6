"""Fixtures for attack tests: a real fleet on loopback and credentials obtained as real peers do.

A fleet here lives for a whole test module (starting one costs seconds); it is started and stopped
with `asyncio.run` because it is only processes, so sync tests (schemathesis) and async tests can
share it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import NET_BASE
from tickle.testing.localfleet import AgentSpec, LocalFleet

# octets of 127.NET_BASE.X kept apart from fleet_factory's 10..249
_OCTETS = iter(range(250, 256))


@dataclass
class Peers:
    """Credentials a real peer holds: the admin token, a task server's, two agents'."""

    fleet: LocalFleet
    ts_name: str  # the fleet's task server the probe agents registered with
    ts_token: str  # a task server registered over HTTP with the task servers' enrollment secret
    agent_a: str
    agent_b: str
    agent_a_name: str = "probe-a"
    agent_b_name: str = "probe-b"

    @property
    def ts_url(self) -> str:
        return self.fleet.ts_url(self.ts_name)


def start_fleet(
    root: Path, task_servers: list[str], agents: list[AgentSpec], **kw: Any
) -> LocalFleet:
    """Start a LocalFleet on a loopback range of its own (stop it with `stop_fleet`)."""
    fleet = LocalFleet(root, task_servers, agents, net=f"127.{NET_BASE}.{next(_OCTETS)}", **kw)
    try:
        asyncio.run(fleet.start())
    except BaseException:
        asyncio.run(fleet.stop())
        raise
    return fleet


def stop_fleet(fleet: LocalFleet) -> None:
    asyncio.run(fleet.stop())


async def call(
    method: str,
    url: str,
    token: str | None = None,
    body: Any = None,
    raw: str | None = None,
    **headers: str,
) -> tuple[int, Any]:
    """One HTTP request (JSON `body`, or `raw` text sent as JSON); returns (status, answer)."""
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if raw is not None:
        headers["Content-Type"] = "application/json"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session,
        session.request(
            method, url, json=body, data=raw.encode() if raw is not None else None, headers=headers
        ) as resp,
    ):
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def register_peers(fleet: LocalFleet, ts_name: str) -> Peers:
    """Register a task server at the NS and two agents at `ts_name`, over HTTP, as peers do."""
    probe_host = f"{fleet.net}.200"
    status, creds = await call(
        "POST",
        fleet.ns_url + "/api/ts/register",
        body={
            "enrollment_secret": fleet.enrollment_secret,
            "name": "probe-ts",
            "tickle_host": probe_host,
            "tickle_port": 50199,
            "api_url": f"http://{probe_host}:50121",
        },
    )
    assert status == 200, creds
    tokens = []
    for i, name in enumerate(("probe-a", "probe-b")):
        status, enrolled = await call(
            "POST",
            fleet.ts_url(ts_name) + "/api/agent/register",
            body={
                "enrollment_secret": fleet.agent_enrollment_secret,
                "name": name,
                "tickle_host": f"{fleet.net}.{201 + i}",
                "tickle_port": 50199,  # nothing listens: tickles to probes are lost
            },
        )
        assert status == 200, enrolled
        tokens.append(enrolled["token"])
    return Peers(fleet, ts_name, creds["token"], tokens[0], tokens[1])


@pytest.fixture(scope="module")
def api_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    """NS + one task server; no agent processes (probe agents register over HTTP)."""
    fleet = start_fleet(tmp_path_factory.mktemp("api-fleet"), ["ts1"], [])
    yield fleet
    stop_fleet(fleet)


@pytest.fixture(scope="module")
def peers(api_fleet: LocalFleet) -> Peers:
    return asyncio.run(register_peers(api_fleet, "ts1"))


def read_sqlite_one(path: Path, query: str) -> tuple[Any, ...]:
    """One row from a component's SQLite file (read-only; the component keeps running)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        row = db.execute(query).fetchone()
    finally:
        db.close()
    assert row is not None, f"nothing for {query!r} in {path}"
    return tuple(row)
