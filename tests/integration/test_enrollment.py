"""Who may register, on real processes: the two enrollment secrets, a stable identity per
computer name, and the operator's approval of new agents and task servers."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.reliability import record
from tickle.agent.control import control_call
from tickle.messages import RegistrationOut
from tickle.testing.localfleet import TS_API_PORT, TS_TICKLE_PORT, AgentSpec, LocalFleet

from .conftest import NET_BASE, Factory, eventually, run_command, wait_run

pytestmark = [pytest.mark.integration, pytest.mark.attacks, pytest.mark.timeout(240)]


async def _post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.post(url, json=body) as resp,
    ):
        return resp.status, json.loads(await resp.text())


async def test_an_agents_secret_cannot_register_a_task_server_nor_the_reverse(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(["ts1"], [])
    rogue = f"{fleet.net}.200"
    as_ts = await _post(
        fleet.ns_url + "/api/ts/register",
        {"enrollment_secret": fleet.agent_enrollment_secret, "name": "rogue-ts",
         "tickle_host": rogue, "tickle_port": 50199, "api_url": f"http://{rogue}:50121"},
    )  # fmt: skip
    as_agent = await _post(
        fleet.ts_url("ts1") + "/api/agent/register",
        {"enrollment_secret": fleet.enrollment_secret, "name": "rogue-pc", "tickle_port": 50199},
    )
    async with fleet.client() as ns:
        task_servers = [t.name for t in await ns.task_servers()]
        computers = [c.name for c in await ns.computers()]
    record(
        case="Enrollment: one tier's secret used by the other",
        done="POST /api/ts/register at the NS with the agents' enrollment secret; POST "
        "/api/agent/register at a task server with the task servers' secret",
        outcome=f"task server: {as_ts[0]}, agent: {as_agent[0]}; registered: "
        f"{task_servers + computers}",
        tried=2,
    )
    assert as_ts == (401, {"detail": "wrong enrollment_secret"})
    assert as_agent == (401, {"detail": "wrong enrollment secret"})
    assert task_servers == ["ts1"]
    assert computers == []


async def test_a_second_agent_with_a_registered_name_is_refused_and_the_first_still_served(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("pc1", ["ts1"])])
    # a cloned VM: another agent (its own state, so its own identity) with the same name
    fleet.add_agent(AgentSpec("pc1-clone", ["ts1"], extra=["--name", "pc1"]))
    fleet.spawn("pc1-clone")
    clone_log = fleet.procs["pc1-clone"].log

    def refused() -> bool:
        return "is registered to another agent" in clone_log.read_text(errors="replace")

    async def probe() -> bool:
        return refused()

    await eventually(probe, 60, "the clone's registration to be refused")
    run = await wait_run(fleet, (await run_command(fleet, ["pc1"], ["true"])).id, 60)
    clone = await control_call(fleet.root / "pc1-clone" / "agent.sock", "GET", "/status")
    original = await control_call(fleet.root / "pc1" / "agent.sock", "GET", "/status")
    async with fleet.client() as ns:
        pc1 = next(c for c in await ns.computers() if c.name == "pc1")
    refusals = [line for line in clone_log.read_text().splitlines() if "refused" in line]
    record(
        case="Identity: a second agent under a registered computer name",
        done="a second agent process (its own state directory) registers as pc1 while pc1's "
        "agent runs; then a run on pc1",
        outcome=f"second agent refused (409), registered={clone['registered']}; the run on pc1: "
        f"{run.executions[0].status} on the original agent",
        tried=len(refusals),
    )
    assert refused()
    assert clone["registered"] is False
    assert run.executions[0].status == "succeeded"
    assert original["executions"].get("succeeded") == 1
    assert pc1.reported_address == fleet.agent_hosts["pc1"]  # the computer did not move
    # one clear line per try, naming the refusal and what the operator can do
    assert "HTTP 409" not in refusals[0]
    assert "tickle computers rekey pc1" in refusals[0]


async def test_a_second_task_server_with_a_registered_name_is_refused_and_the_first_serves(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("pc1", ["ts1"])])
    log = fleet.root / "ts1-clone.log"
    clone = _second_task_server(fleet, "ts1", f"{fleet.net}.9", log)  # between TS and agents
    try:

        async def refused() -> bool:
            return "is registered to another task server" in log.read_text(errors="replace")

        await eventually(refused, 60, "the second ts1 to be refused")
        run = await wait_run(fleet, (await run_command(fleet, ["pc1"], ["true"])).id, 60)
        async with fleet.client() as ns:
            [ts1] = await ns.task_servers()
    finally:
        clone.terminate()
        await asyncio.to_thread(clone.wait, 10)
    record(
        case="Identity: a second task server under a registered name",
        done="a second task server process (its own state directory, both secrets) registers "
        "as ts1 while ts1 runs; then a run on ts1's agent",
        outcome=f"second ts1 refused (409), kept waiting; ts1 still at {ts1.tickle_host}; the "
        f"run: {run.executions[0].status}",
        tried=1,
    )
    assert ts1.tickle_host == fleet.ts_hosts["ts1"]  # the NS still tickles the first one
    assert run.executions[0].status == "succeeded"
    assert run.executions[0].via == "tickle"


def _second_task_server(
    fleet: LocalFleet, name: str, host: str, log: Path
) -> subprocess.Popen[bytes]:
    """Another task server process named `name`, with its own state and both secrets."""
    argv = [
        sys.executable, "-m", "tickle", "task-server", "--name", name, "--ns-url", fleet.ns_url,
        "--api-host", host, "--api-port", str(TS_API_PORT), "--tickle-host", host,
        "--tickle-port", str(TS_TICKLE_PORT), "--state-dir", str(fleet.root / f"{name}-clone"),
    ]  # fmt: skip
    env = {  # never on argv
        **os.environ,
        "TICKLE_TS_ENROLLMENT_SECRET": fleet.enrollment_secret,
        "TICKLE_TS_AGENT_ENROLLMENT_SECRET": fleet.agent_enrollment_secret,
    }
    with log.open("wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


@pytest.fixture
async def manual_fleet(tmp_path: Path) -> AsyncIterator[LocalFleet]:
    """NS with registration_approval = manual, ts1, agents pc1 and pc2; nothing started."""
    fleet = LocalFleet(
        tmp_path / "manual", ["ts1"], [AgentSpec("pc1", ["ts1"]), AgentSpec("pc2", ["ts1"])],
        net=f"127.{NET_BASE}.248", ns_extra=["--registration-approval", "manual"],
    )  # fmt: skip
    yield fleet
    await fleet.stop()


async def _waiting(fleet: LocalFleet, kind: str, names: set[str]) -> list[RegistrationOut]:
    async def probe() -> list[RegistrationOut] | None:
        async with fleet.client() as ns:
            found = [r for r in await ns.registrations() if r.kind == kind]
        return found if {r.name for r in found} >= names else None

    return await eventually(probe, 60, f"{kind} registrations {sorted(names)} to wait")


async def test_with_manual_approval_new_peers_wait_and_a_rejected_agent_never_gets_work(
    manual_fleet: LocalFleet,
) -> None:
    fleet = manual_fleet
    fleet.spawn("ns")
    await fleet.wait_healthy(fleet.ns_url, "ns", 60)  # generous: a loaded machine
    fleet.spawn("ts1")
    [ts1] = await _waiting(fleet, "task_server", {"ts1"})
    assert ts1.state == "pending"
    async with fleet.client() as ns:
        assert await ns.task_servers() == []  # no credentials, no tickle key
        await ns.decide("task_server", "ts1", "approve")
    await fleet.wait_healthy(fleet.ts_url("ts1"), "ts1", 60)

    fleet.spawn("pc1")
    fleet.spawn("pc2")
    waiting = await _waiting(fleet, "computer", {"pc1", "pc2"})
    assert {(r.name, r.state, r.task_server) for r in waiting} == {
        ("pc1", "pending", "ts1"), ("pc2", "pending", "ts1"),
    }  # fmt: skip
    async with fleet.client() as ns:
        assert await ns.computers() == []
        await ns.decide("computer", "pc1", "approve")
        await ns.decide("computer", "pc2", "reject")
    await fleet.wait_registered(["pc1"], 60)
    run = await wait_run(fleet, (await run_command(fleet, ["pc1"], ["true"])).id, 60)

    pc2_log = fleet.procs["pc2"].log

    async def pc2_told() -> bool:
        return "computer pc2 was rejected by an operator" in pc2_log.read_text(errors="replace")

    await eventually(pc2_told, 60, "pc2 to be told it was rejected")
    pc2 = await control_call(fleet.root / "pc2" / "agent.sock", "GET", "/status")
    async with fleet.client() as ns:
        computers = [c.name for c in await ns.computers()]
        left = [(r.name, r.state) for r in await ns.registrations()]
    record(
        case="Approval: registration_approval = manual",
        done="new task server and two agents start against an NS in manual mode; the operator "
        "approves the task server and pc1, rejects pc2; a run on pc1",
        outcome=f"each waited (403) until decided; run on pc1 {run.executions[0].status}; pc2 "
        f"registered={pc2['registered']}, computers={computers}",
        tried=3,
    )
    assert run.executions[0].status == "succeeded"
    assert pc2["registered"] is False
    assert computers == ["pc1"]
    assert left == [("pc2", "rejected")]
    assert "agent pc2 registered" not in (fleet.root / "ts1.log").read_text()
