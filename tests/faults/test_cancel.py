"""Cancel, expiry, loss and rerun on real processes: work that was cancelled or expired before it
started never starts anywhere; running work is stopped with its whole process tree and recorded
`cancelled` once; an execution whose agent died ends `lost`, then shows what the agent reports
when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Factory, agent_ctl, eventually, metric
from tests.reliability import record
from tickle.messages import ExecutionOut, RunCreate, RunOut, SettingsUpdate, TaskCreate
from tickle.testing.localfleet import AgentSpec, LocalFleet

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(120)]

# the NS ends expired and lost executions this often in these tests
FAST_SWEEP = ["--sweep-interval-s", "0.2"]


async def add_run(
    fleet: LocalFleet, computers: list[str], script: str, timeout_s: float = 60, **run: object
) -> RunOut:
    async with fleet.client() as ns:
        task = await ns.add_task(
            TaskCreate(name=f"t{time.monotonic_ns()}", script=script, timeout_s=timeout_s)
        )
        return await ns.run_now(RunCreate(task_id=task.id, computers=computers, **run))  # type: ignore[arg-type]


async def execution(fleet: LocalFleet, execution_id: int) -> ExecutionOut:
    async with fleet.client() as ns:
        return await ns.execution(execution_id)


async def until_status(
    fleet: LocalFleet, execution_id: int, statuses: set[str], deadline_s: float
) -> ExecutionOut:
    async def probe() -> ExecutionOut | None:
        e = await execution(fleet, execution_id)
        return e if e.status in statuses else None

    return await eventually(probe, deadline_s, f"execution {execution_id} to be {statuses}")


def finished_events(fleet: LocalFleet, execution_id: int) -> list[str]:
    """The statuses of the `finished` events the NS recorded for an execution."""
    db = sqlite3.connect(f"file:{fleet.root / 'ns' / 'ns.db'}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT body FROM status_events WHERE execution_id = ? AND kind = 'finished'",
            (execution_id,),
        ).fetchall()
    finally:
        db.close()
    return [json.loads(body)["status"] for (body,) in rows]


async def ts_pulled_since(fleet: LocalFleet, name: str, since: float, deadline_s: float) -> None:
    async def probe() -> bool:
        async with fleet.client() as ns:
            servers = {s.name: s for s in await ns.task_servers()}
        return (servers[name].last_pull_at or 0) > since

    await eventually(probe, deadline_s, f"{name} to pull from the NS")


def check_now(fleet: LocalFleet, agent: str) -> dict[str, object]:
    """`tickle agent check-now`: what the pull returned and what it started."""
    done = agent_ctl(fleet, agent, "check-now")
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purpose
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def read_pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip())
    return None


async def test_cancel_before_the_task_server_pulled_never_starts_it(
    fleet_factory: Factory, tmp_path: Path
) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("a1", ["ts1"])])
    marker = tmp_path / "ran"
    fleet.signal("ts1", signal.SIGSTOP)  # the NS's tickle waits in its socket, unread
    try:
        run = await add_run(fleet, ["a1"], f"touch {marker}")
        eid = run.executions[0].id
        cancelled_at = time.time()
        async with fleet.client() as ns:
            out = await ns.cancel(run.id)
        assert (out.cancelled, out.stopping, out.already_final) == ([eid], [], [])
    finally:
        fleet.signal("ts1", signal.SIGCONT)
    await ts_pulled_since(fleet, "ts1", cancelled_at, 20)
    answer = check_now(fleet, "a1")
    assert answer["executions"] == []
    assert answer["started"] == []
    e = await execution(fleet, eid)
    assert e.status == "cancelled"
    assert e.timeline[5].step == "started"
    assert e.timeline[5].at is None
    assert not marker.exists()


async def test_cancel_after_the_task_server_pulled_never_starts_it_at_the_agent(
    fleet_factory: Factory, tmp_path: Path
) -> None:
    # tickles to the agent are lost and it polls every 30 min: the work waits at the task server
    fleet = await fleet_factory(["ts1"], [AgentSpec("a1", ["ts1"], blocked=True)])
    marker = tmp_path / "ran"
    run = await add_run(fleet, ["a1"], f"touch {marker}")
    eid = run.executions[0].id

    async def cached() -> bool:
        return (await execution(fleet, eid)).timeline[2].at is not None  # ts_pulled

    await eventually(cached, 20, "the task server to pull the work")
    cancelled_at = time.time()
    async with fleet.client() as ns:
        out = await ns.cancel(run.id, eid)
    assert out.cancelled == [eid]
    await ts_pulled_since(fleet, "ts1", cancelled_at, 20)  # the cancel's tickle
    answer = check_now(fleet, "a1")
    assert answer["executions"] == []
    assert answer["started"] == []
    e = await execution(fleet, eid)
    assert (e.status, e.timeline[5].at) == ("cancelled", None)
    assert not marker.exists()
    assert await metric(fleet.ns_url, "tickle_executions_total", status="cancelled") == 1
    record(
        case="cancel of work cached at its task server",
        done="run-now to an agent whose tickles are lost, the task server pulled it;"
        " cancel, then the agent pulls (check-now)",
        outcome="pass" if not marker.exists() and e.status == "cancelled" else "fail",
        tried=1,
        status=e.status,
        started=int(marker.exists()),
    )


async def test_cancel_while_running_kills_the_process_tree_and_records_cancelled_once(
    fleet_factory: Factory, tmp_path: Path
) -> None:
    fleet = await fleet_factory(
        ["ts1"], [AgentSpec("a1", ["ts1"], extra=["--task-kill-grace-s", "1"])]
    )
    main_pid, escaped_pid = tmp_path / "main.pid", tmp_path / "escaped.pid"
    # the task starts a process in a session of its own (it escapes the process group), then
    # sleeps; both must die
    script = (
        f"echo $$ > {main_pid}\n"
        f"setsid sh -c 'echo $$ > {escaped_pid}; exec sleep 3600' &\n"
        "exec sleep 3600\n"
    )
    run = await add_run(fleet, ["a1"], script, timeout_s=600)
    eid = run.executions[0].id
    await until_status(fleet, eid, {"running"}, 20)
    await eventually(
        lambda: asyncio.sleep(0, read_pid(main_pid) and read_pid(escaped_pid)), 20, "the pids"
    )
    pids = [read_pid(main_pid), read_pid(escaped_pid)]
    began = time.monotonic()
    try:
        async with fleet.client() as ns:
            out = await ns.cancel(run.id)
        assert (out.cancelled, out.stopping) == ([], [eid])
        e = await until_status(fleet, eid, {"cancelled"}, 20)
        took = round(time.monotonic() - began, 2)

        async def all_dead() -> bool:
            return not any(alive(p) for p in pids if p)

        await eventually(all_dead, 10, "the task's processes to die")
        # another pull and another cancel change nothing: the cancel is recorded once
        check_now(fleet, "a1")
        async with fleet.client() as ns:
            again = await ns.cancel(run.id)
        assert again.already_final == [eid]
        await asyncio.sleep(0.5)  # what a second report would take to arrive (none must)
        events = finished_events(fleet, eid)
    finally:
        for p in pids:
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(p, signal.SIGKILL)  # type: ignore[arg-type]
    cancelled = await metric(fleet.ns_url, "tickle_executions_total", status="cancelled")
    record(
        case="cancel while a task runs",
        done="cancel a running task that started a process in a new session (setsid);"
        " agent kill grace 1 s",
        outcome="pass" if e.status == "cancelled" and events == ["cancelled"] else "fail",
        tried=1,
        status=e.status,
        recorded=len(events),
        stopped_after_s=took,
        survivors=sum(1 for p in pids if p and alive(p)),
    )
    assert events == ["cancelled"]
    assert cancelled == 1
    assert "cancelled by the operator" in (e.output_tail or "")


async def test_cancel_reaches_an_agent_whose_tickles_are_lost_at_its_next_contact(
    fleet_factory: Factory, tmp_path: Path
) -> None:
    fleet = await fleet_factory(
        ["ts1"], [AgentSpec("a1", ["ts1"], blocked=True, extra=["--task-kill-grace-s", "1"])]
    )
    pidfile = tmp_path / "main.pid"
    run = await add_run(fleet, ["a1"], f"echo $$ > {pidfile}; exec sleep 3600", timeout_s=600)
    eid = run.executions[0].id
    assert check_now(fleet, "a1")["started"] == [eid]  # the agent pulled it and runs it
    await until_status(fleet, eid, {"running"}, 20)
    pid = await eventually(lambda: asyncio.sleep(0, read_pid(pidfile)), 20, "the task's pid")
    try:
        async with fleet.client() as ns:
            assert (await ns.cancel(run.id)).stopping == [eid]
        # the task server's tickle is lost: the cancel waits for the agent's next contact
        await asyncio.sleep(1.0)
        assert (await execution(fleet, eid)).status == "running"
        check_now(fleet, "a1")
        e = await until_status(fleet, eid, {"cancelled"}, 20)
        await eventually(lambda: asyncio.sleep(0, not alive(pid)), 10, "the task to die")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert finished_events(fleet, eid) == ["cancelled"]
    assert e.cancel_requested_at is not None


async def test_executions_not_started_by_their_expiry_end_expired_and_never_start(
    fleet_factory: Factory, tmp_path: Path
) -> None:
    fleet = await fleet_factory(
        ["ts1"], [AgentSpec("a1", ["ts1"], blocked=True)], ns_extra=FAST_SWEEP
    )
    marker = tmp_path / "ran"
    run = await add_run(fleet, ["a1"], f"touch {marker}", expires_in_s=1.0)
    eid = run.executions[0].id
    assert run.expires_at is not None
    assert run.expires_at - run.executions[0].timeline[0].at < 2
    e = await until_status(fleet, eid, {"expired"}, 20)
    assert e.timeline[5].at is None
    # its task server still holds it (nothing tickled it since): the agent sees the expiry
    answer = check_now(fleet, "a1")
    assert answer["executions"] == [eid]
    assert answer["started"] == []
    assert not marker.exists()
    assert (await execution(fleet, eid)).status == "expired"
    assert await metric(fleet.ns_url, "tickle_executions_total", status="expired") == 1


async def test_agent_killed_mid_task_ends_lost_then_reports_interrupted_when_it_returns(
    fleet_factory: Factory, tmp_path: Path
) -> None:
    # lost after 1 Task Request Interval (10 s) past the end of the task's timeout (4 s)
    fleet = await fleet_factory(
        ["ts1"],
        [AgentSpec("a1", ["ts1"])],
        ns_extra=[*FAST_SWEEP, "--lost-after-intervals", "1", "--lost-grace-s", "0"],
    )
    async with fleet.client() as ns:
        await ns.update_settings(SettingsUpdate(task_request_interval_s=10))
    pidfile = tmp_path / "task.pid"
    run = await add_run(fleet, ["a1"], f"echo $$ > {pidfile}; exec sleep 30", timeout_s=4)
    eid = run.executions[0].id
    await until_status(fleet, eid, {"running"}, 20)
    pid = await eventually(lambda: asyncio.sleep(0, read_pid(pidfile)), 20, "the task's pid")
    fleet.kill("a1")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)  # a service manager would kill it with the agent
    killed_at = time.monotonic()
    lost = await until_status(fleet, eid, {"lost"}, 30)
    lost_after = round(time.monotonic() - killed_at, 1)
    fleet.spawn("a1")
    back = await until_status(fleet, eid, {"interrupted"}, 30)
    lost_count = await metric(fleet.ns_url, "tickle_executions_total", status="lost")
    interrupted = await metric(fleet.ns_url, "tickle_executions_total", status="interrupted")
    events = finished_events(fleet, eid)
    record(
        case="agent SIGKILLed mid-task and gone: lost, then its late report",
        done="SIGKILL the agent mid-task (timeout 4 s, Task Request Interval 10 s,"
        " lost after 1 interval), restart it once the NS shows the execution lost",
        outcome="pass" if lost.status == "lost" and back.status == "interrupted" else "fail",
        tried=1,
        status=back.status,
        recorded=len(events),
        lost_after_s=lost_after,
    )
    assert lost_after >= 4 + 10 - 2  # not before the bound (its timeout, then one interval)
    assert events == ["interrupted"]
    assert (lost_count, interrupted) == (1, 0)  # counted once, when it was found lost


async def test_rerun_of_failed_targets_the_computers_that_did_not_succeed_and_all_targets_all(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(
        ["ts1"],
        [
            AgentSpec("a1", ["ts1"]),
            AgentSpec("a2", ["ts1"], blocked=True),
            AgentSpec("a3", ["ts1"]),
        ],
        ns_extra=FAST_SWEEP,
    )
    # a1 succeeds; a2 gets nothing before the expiry (its tickles are lost, it polls rarely)
    run = await add_run(fleet, ["a1", "a2"], "true", expires_in_s=1.0)

    async def ended() -> RunOut | None:
        got = await _run(fleet, run.id)
        statuses = sorted(e.status for e in got.executions)
        return got if statuses == ["expired", "succeeded"] else None

    before = await eventually(ended, 30, "a1 to succeed and a2 to expire")
    base = [sys.executable, "-m", "tickle", "--ns-url", fleet.ns_url, "--admin-token",
            fleet.admin_token]  # fmt: skip
    rerun = _cli(base, "run", "--rerun", str(run.id), "--failed", "--no-watch", "--json")
    assert rerun.returncode == 0, rerun.stderr
    again = json.loads(rerun.stdout)  # the CLI's JSON: RunOut with ISO 8601 times
    assert [e["computer"] for e in again["executions"]] == ["a2"]
    assert (again["task_id"], again["job_id"]) == (before.task_id, before.job_id)
    everyone = _cli(base, "run", "--all", "--task", str(before.task_id), "--no-watch", "--json")
    assert everyone.returncode == 0, everyone.stderr
    on = sorted(e["computer"] for e in json.loads(everyone.stdout)["executions"])
    assert on == ["a1", "a2", "a3"]
    # a run where every computer succeeded has nothing to rerun
    ok = await add_run(fleet, ["a1"], "true")
    await eventually(lambda: _final(fleet, ok.id, {"a1"}), 30, "the run on a1")
    nothing = _cli(base, "run", "--rerun", str(ok.id), "--failed", "--no-watch")
    assert (nothing.returncode, nothing.stderr.strip()) == (
        1,
        f"tickle: POST /api/runs/{ok.id}/rerun?failed=true: HTTP 409: "
        f"run {ok.id} has no computer to run again (none failed)",
    )


def _cli(base: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=60, check=False)


async def _run(fleet: LocalFleet, run_id: int) -> RunOut:
    async with fleet.client() as ns:
        return await ns.run(run_id)


async def _final(fleet: LocalFleet, run_id: int, computers: set[str]) -> bool:
    got = await _run(fleet, run_id)
    return all(e.status == "succeeded" for e in got.executions if e.computer in computers)
