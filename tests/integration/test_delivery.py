"""The nine-step delivery sequence and the rules of the original, on real processes on loopback."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Awaitable
from pathlib import Path

import aiohttp
import pytest

from tickle import wire
from tickle.console import timeline_times
from tickle.messages import ComputerOut, JobCreate, RunCreate, SettingsUpdate, TaskCreate
from tickle.testing.localfleet import AgentSpec, LocalFleet

from .conftest import (
    Factory,
    agent_ctl,
    eventually,
    metric,
    run_command,
    udp_inodes_of,
    wait_run,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
NINE_STEPS = [
    "created", "tickle_sent", "ts_pulled", "agent_tickled", "agent_pulled",
    "started", "finished", "cached_at_ts", "recorded",
]  # fmt: skip


async def test_run_now_goes_through_the_nine_steps_in_order(fleet_factory: Factory) -> None:
    fleet = await fleet_factory(
        ["ts1", "ts2"],
        [AgentSpec("a1", ["ts1"]), AgentSpec("a2", ["ts1"]), AgentSpec("a3", ["ts2"])],
    )
    run = await run_command(fleet, ["a1", "a2", "a3"], ["echo", "hello"])
    run = await wait_run(fleet, run.id, 20)  # the interval is 1800 s: only tickles explain this
    for execution in run.executions:
        assert execution.status == "succeeded", execution
        assert execution.via == "tickle"
        assert "hello" in (execution.output_tail or "")
        times = timeline_times(execution)
        assert [s.step for s in execution.timeline] == NINE_STEPS
        stamps = [times[s] for s in NINE_STEPS]
        assert all(t is not None for t in stamps), times
        assert stamps == sorted(stamps), f"steps out of order: {times}"  # type: ignore[type-var]

    async def reachable() -> dict[str, ComputerOut] | None:
        # the task servers report reachability in the background (changes close together go
        # in one post): it may land just after the run's last event
        async with fleet.client() as ns:
            found = {c.name: c for c in await ns.computers()}
        ours = [found[n].tickle_state for n in ("a1", "a2", "a3")]
        return found if all(state == "reachable" for state in ours) else None

    computers = await eventually(reachable, 10, "a1, a2, a3 reported tickle-reachable")
    assert {computers[n].task_server for n in ("a1", "a2")} == {"ts1"}
    assert computers["a3"].task_server == "ts2"
    assert not any(c.nat_detected for c in computers.values())
    async with fleet.client() as ns:
        servers = await ns.task_servers()
    # the task servers' tickle-caused pulls acknowledged the NS's tickles
    assert {s.name: s.tickle_state for s in servers} == {"ts1": "reachable", "ts2": "reachable"}


async def test_blocked_tickles_task_arrives_by_polling_and_agent_shown_unreachable(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(
        ["ts1"], [AgentSpec("blocked", ["ts1"], blocked=True)],
        ts_extra=["--tickle-tries", "3", "--tickle-backoff-s", "0.2", "--tickle-backoff-max-s", "0.5"],
    )  # fmt: skip
    async with fleet.client() as ns:
        await ns.update_settings(SettingsUpdate(task_request_interval_s=10, poll_jitter_fraction=0))
    # the agent takes the new interval at its next contact; a policy refresh is such a contact
    assert agent_ctl(fleet, "blocked", "policy-refresh").returncode == 0
    run = await run_command(fleet, ["blocked"], ["true"])
    run = await wait_run(fleet, run.id, 30)
    assert run.executions[0].status == "succeeded"
    assert run.executions[0].via == "poll"

    async def unreachable() -> bool:
        async with fleet.client() as ns:
            return any(c.tickle_state == "unreachable" for c in await ns.computers())

    await eventually(unreachable, 10, "the NS to show the agent tickle-unreachable")


async def test_policy_refresh_does_not_fetch_tasks_but_check_now_does(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("quiet", ["ts1"], blocked=True)])
    run = await run_command(fleet, ["quiet"], ["true"])
    refresh = agent_ctl(fleet, "quiet", "policy-refresh")
    assert refresh.returncode == 0, refresh.stderr
    async with fleet.client() as ns:
        assert (await ns.run(run.id)).executions[0].status in ("pending", "delivered")
    check = agent_ctl(fleet, "quiet", "check-now")
    assert check.returncode == 0, check.stderr
    run = await wait_run(fleet, run.id, 10)
    assert run.executions[0].status == "succeeded"
    assert run.executions[0].via == "check_now"


async def test_cem_agent_binds_no_udp_gets_no_tickle_and_gets_work_by_polling(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("cem1", ["ts1"], cem=True)])
    pid = fleet.procs["cem1"].popen.pid  # type: ignore[union-attr]
    assert udp_inodes_of(pid) == set(), "a CEM agent must open no UDP socket"
    async with fleet.client() as ns:
        await ns.update_settings(SettingsUpdate(task_request_interval_s=10, poll_jitter_fraction=0))
        computers = await ns.computers()
    assert computers[0].tickle_state == "cem"
    assert agent_ctl(fleet, "cem1", "policy-refresh").returncode == 0
    run = await run_command(fleet, ["cem1"], ["true"])
    run = await wait_run(fleet, run.id, 30)
    assert run.executions[0].status == "succeeded"
    assert run.executions[0].via == "poll"
    assert timeline_times(run.executions[0])["agent_tickled"] is None
    ts = fleet.ts_url("ts1")
    assert await metric(ts, "tickle_tickles_sent_total", kind="tasks") == 0
    assert await metric(ts, "tickle_tickles_skipped_cem_total") >= 1
    # long-poll is off by default: the CEM agent only polls
    assert await metric(ts, "tickle_long_polls_waiting") == 0
    assert await metric(ts, "tickle_pulls_total", via="long_poll") == 0
    assert '"long_polling": false' in agent_ctl(fleet, "cem1", "status").stdout


async def test_settings_change_reaches_task_server_and_agents(fleet_factory: Factory) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("a1", ["ts1"])])
    ts = fleet.ts_url("ts1")
    before = await metric(ts, "tickle_tickles_received_total", kind="settings")
    async with fleet.client() as ns:
        await ns.update_settings(SettingsUpdate(task_request_interval_s=1234))
    await eventually(
        lambda: _gt(metric(ts, "tickle_tickles_received_total", kind="settings"), before),
        10, "the settings tickle at the task server",
    )  # fmt: skip

    async def agent_has_new_interval() -> bool:
        status = agent_ctl(fleet, "a1", "status")
        return status.returncode == 0 and '"task_request_interval_s": 1234' in status.stdout

    await eventually(agent_has_new_interval, 10, "the agent to hold the new interval")


async def _gt(value: Awaitable[float], than: float) -> bool:
    return await value > than


async def test_task_server_tickles_its_agents_natively_when_ns_tickle_is_lost(
    fleet_factory: Factory,
) -> None:
    # the NS tickles the task server at a port where nothing listens: every NS tickle is lost
    fleet = await fleet_factory(
        ["ts1"], [AgentSpec("a1", ["ts1"])], ts_extra=["--advertise-port", "50198"]
    )
    async with fleet.client() as ns:
        await ns.update_settings(SettingsUpdate(ts_check_interval_s=5))
    # the settings tickle is lost too: the task server learns the interval when it starts
    fleet.kill("ts1")
    fleet.spawn("ts1")
    await fleet.wait_healthy(fleet.ts_url("ts1"), "ts1", 30)
    run = await run_command(fleet, ["a1"], ["true"])
    run = await wait_run(fleet, run.id, 30)
    execution = run.executions[0]
    assert execution.status == "succeeded"
    assert execution.via == "tickle"  # tickled by the task server alone, not polled (1800 s)


async def test_checks_during_the_resend_window_leave_a_task_server_with_blocked_tickles_unreachable(
    fleet_factory: Factory,
) -> None:
    # every NS tickle to ts1 is lost; ts1 checks the NS every 5 s, inside each resend window
    # (tries at 0, 1, 3 and 7 s, the last one answered until 11 s, each +/- 10%)
    window_s = 0.9 * (1 + 2 + 4 + 4)
    fleet = await fleet_factory(
        ["ts1"], [AgentSpec("a1", ["ts1"])],
        ns_extra=["--tickle-tries", "4", "--tickle-backoff-s", "1", "--tickle-backoff-max-s", "4"],
        ts_extra=["--advertise-port", "50198"],
    )  # fmt: skip
    async with fleet.client() as ns:
        await ns.update_settings(SettingsUpdate(ts_check_interval_s=5))
    # the settings tickle is lost too: the task server learns the interval when it starts
    fleet.kill("ts1")
    fleet.spawn("ts1")
    await fleet.wait_healthy(fleet.ts_url("ts1"), "ts1", 30)

    async def settings_tickle_over() -> bool:
        async with fleet.client() as ns:
            (server,) = await ns.task_servers()
        return server.tickle_state != "unknown"

    async def unreachable_flights() -> float:
        return await metric(fleet.ns_url, "tickle_tickles_unreachable_total")

    async def one_more_unreachable() -> bool:
        return await unreachable_flights() > before

    await eventually(settings_tickle_over, 30, "the settings tickle to end")
    before = await unreachable_flights()
    run = await run_command(fleet, ["a1"], ["true"])
    run = await wait_run(fleet, run.id, 30)
    times = timeline_times(run.executions[0])
    sent, pulled = times["tickle_sent"], times["ts_pulled"]
    assert sent is not None
    assert pulled is not None
    assert pulled - sent < window_s, "a check pulled the work while the tickle was resent"
    await eventually(one_more_unreachable, 30, "the tasks tickle to run out without an ack")
    async with fleet.client() as ns:
        (server,) = await ns.task_servers()
    assert server.tickle_state == "unreachable"
    assert server.last_pull_at is not None
    assert server.last_pull_at >= pulled


async def test_forged_and_malformed_datagrams_cause_no_pull_and_are_counted(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("a1", ["ts1"])])
    ts = fleet.ts_url("ts1")
    # only pulls a tickle caused count: the agent's own start-up poll may land at any time
    pulls_before = await metric(ts, "tickle_pulls_total", via="tickle")
    ts_addr = (fleet.ts_hosts["ts1"], 50123)
    agent_addr = (fleet.agent_hosts["a1"], 50124)
    now_ms = int(time.time() * 1000)
    forged = wire.encode(wire.Kind.TASKS, "ns", 1, b"not-the-key" * 3)
    forged_agent = wire.encode(wire.Kind.TASKS, "ts1", 1, b"not-the-key" * 3)
    stale = wire.encode(wire.Kind.TASKS, "ns", 2, b"x" * 32, sent_at_ms=now_ms - 3_600_000)
    altered = bytearray(forged)
    altered[5] ^= 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for datagram in (forged, stale, b"garbage", bytes(altered), b"\x00" * 600):
            s.sendto(datagram, ts_addr)
        for datagram in (forged_agent, b"garbage"):
            s.sendto(datagram, agent_addr)

    async def rejected() -> float:
        return await metric(ts, "tickle_tickles_rejected_total")

    count = await eventually(lambda: _ge(rejected(), 5), 5, "5 rejections at the task server")
    assert count
    assert await metric(ts, "tickle_tickles_rejected_total", reason="bad_mac") >= 1
    assert await metric(ts, "tickle_tickles_rejected_total", reason="malformed") >= 2
    async with fleet.client() as ns:
        servers = await ns.task_servers()
    last_pull = servers[0].last_pull_at
    assert await metric(ts, "tickle_pulls_total", via="tickle") == pulls_before
    async with fleet.client() as ns:
        assert (await ns.task_servers())[0].last_pull_at == last_pull


async def _ge(value: Awaitable[float], than: float) -> float:
    v = await value
    return v if v >= than else 0.0


async def test_job_of_three_tasks_stops_at_the_failing_one(fleet_factory: Factory) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("a1", ["ts1"])])
    async with fleet.client() as ns:
        ids = [
            (await ns.add_task(TaskCreate(name=n, command=c))).id
            for n, c in (
                ("one", ["true"]),
                ("two", ["false"]),
                ("three", ["touch", str(fleet.root / "ran-three")]),
            )
        ]
        job = await ns.add_job(JobCreate(name="three-steps", task_ids=ids))
        run = await ns.run_now(RunCreate(job_id=job.id, computers=["a1"]))
    run = await wait_run(fleet, run.id, 20)
    execution = run.executions[0]
    assert execution.status == "failed"
    assert [s.name for s in execution.steps] == ["one", "two"]
    assert [s.status for s in execution.steps] == ["succeeded", "failed"]
    assert not (fleet.root / "ran-three").exists()


async def test_status_events_queued_while_task_server_is_down_are_delivered_after(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("a1", ["ts1"])])
    started, finished = fleet.root / "started", fleet.root / "finished"
    script = f"touch {started}; sleep 2; echo done; touch {finished}"
    run = await run_command(fleet, ["a1"], ["sh", "-c", script])
    await eventually(lambda: _exists(started), 15, "the task to start")
    fleet.kill("ts1")
    # the task finishes while its task server is down; its events wait in the agent's outbox
    await eventually(lambda: _exists(finished), 15, "the task to finish on the agent")
    depth = await eventually(
        lambda: _outbox_depth(fleet, "a1"), 15, "the finished event queued at the agent"
    )
    assert depth >= 1
    async with fleet.client() as ns:
        assert (await ns.run(run.id)).executions[0].status != "succeeded"
    fleet.spawn("ts1")
    run = await wait_run(fleet, run.id, 40)
    assert run.executions[0].status == "succeeded"
    assert "done" in (run.executions[0].output_tail or "")


async def _exists(path: Path) -> bool:
    return path.exists()


async def _outbox_depth(fleet: LocalFleet, name: str) -> int:
    status = agent_ctl(fleet, name, "status")
    if status.returncode != 0:
        return 0
    return int(json.loads(status.stdout).get("outbox_depth", 0))


async def test_agent_talks_only_to_its_task_server_never_to_the_ns(fleet_factory: Factory) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("a1", ["ts1"])])
    run = await wait_run(fleet, (await run_command(fleet, ["a1"], ["true"])).id, 20)
    assert run.executions[0].status == "succeeded"
    # the NS has no agent-facing routes at all: there is nothing an agent could pull from it
    async with (
        aiohttp.ClientSession() as session,
        session.get(fleet.ns_url + "/api/agent/tasks") as resp,
    ):
        assert resp.status == 404
    args = " ".join(fleet.procs["a1"].argv)
    assert fleet.ns_url not in args
    assert "50120" not in args
