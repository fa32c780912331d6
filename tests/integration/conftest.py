"""Fixtures for integration tests: real NS, task server and agent processes on loopback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tickle.messages import RunCreate, RunOut, TaskCreate
from tickle.testing.localfleet import AgentSpec, LocalFleet

# what the fleet_factory fixture gives a test: start a fleet (task servers, agents, options)
Factory = Callable[..., Awaitable[LocalFleet]]

T = TypeVar("T")


def _net_base() -> int:
    """The second octet of this process's loopback range 127.X.0.0/16 (61..120): each pytest
    session takes its own, so sessions running at once do not collide, and each xdist worker of
    one session (`pytest -n N`) a different one from its siblings."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ... under pytest-xdist
    if worker is None:
        return 61 + os.getpid() % 60
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getppid())
    return 61 + (zlib.crc32(run.encode()) + int(worker.removeprefix("gw"))) % 60


NET_BASE = _net_base()


async def eventually(
    probe: Callable[[], Awaitable[T | None]], deadline_s: float, what: str, every_s: float = 0.1
) -> T:
    """Call `probe` until it returns something truthy, or fail naming `what` after the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline_s}s waiting for {what}")
        await asyncio.sleep(every_s)


async def metric(url: str, name: str, **labels: str) -> float:
    """The value of one sample on a component's /metrics (0 when absent)."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def run_command(fleet: LocalFleet, computers: list[str], argv: list[str]) -> RunOut:
    async with fleet.client() as ns:
        task = await ns.add_task(
            TaskCreate(name=f"t{time.monotonic_ns()}", command=argv, timeout_s=30)
        )
        return await ns.run_now(RunCreate(task_id=task.id, computers=computers))


async def wait_run(fleet: LocalFleet, run_id: int, deadline_s: float) -> RunOut:
    """The run once every execution is final and its timeline settled (`ExecutionOut.settled`:
    one clean-clone CI run read `via` before the `agent_pulled` that carries it was recorded)."""

    async def probe() -> RunOut | None:
        async with fleet.client() as ns:
            run = await ns.run(run_id)
        return run if all(e.settled() for e in run.executions) else None

    return await eventually(probe, deadline_s, f"run {run_id} to finish")


def agent_ctl(fleet: LocalFleet, name: str, action: str) -> subprocess.CompletedProcess[str]:
    """`tickle agent <action>` against a running agent of the fleet, as an operator types it."""
    return subprocess.run(
        [sys.executable, "-m", "tickle", "agent", action, "--state-dir", str(fleet.root / name)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def tickle_cli(fleet: LocalFleet, *argv: str) -> subprocess.CompletedProcess[str]:
    """`tickle ...` against the fleet's NS, as an operator types it."""
    env = dict(os.environ, TICKLE_NS_URL=fleet.ns_url, TICKLE_ADMIN_TOKEN=fleet.admin_token)
    return subprocess.run(
        [sys.executable, "-m", "tickle", *argv], capture_output=True, text=True, timeout=30,
        env=env, check=False,
    )  # fmt: skip


@pytest.fixture
async def fleet_factory(tmp_path: Path) -> AsyncIterator[Factory]:
    """Start fleets for one test; stop them all at the end, printing logs of failures."""
    fleets: list[LocalFleet] = []
    counter = iter(range(10, 250))

    async def make(task_servers: list[str], agents: list[AgentSpec], **kw: object) -> LocalFleet:
        fleet = LocalFleet(
            tmp_path / f"fleet{len(fleets)}",
            task_servers,
            agents,
            net=f"127.{NET_BASE}.{next(counter)}",
            **kw,  # type: ignore[arg-type]
        )
        fleets.append(fleet)
        await fleet.start()
        return fleet

    yield make
    for fleet in fleets:
        await fleet.stop()


def udp_inodes_of(pid: int) -> set[str]:
    """The inodes of the UDP sockets process `pid` holds open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    udp = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as f:
            next(f)
            udp |= {line.split()[9] for line in f}
    return inodes & udp
