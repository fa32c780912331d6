"""Run history and deletions on real processes: list and filter runs, page them, a computer's
executions, ad-hoc commands that leave no task behind, and deleting each kind of thing."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.reliability import record
from tickle.console import ConsoleError
from tickle.messages import JobCreate, RunCreate, RunOut, TaskCreate, TaskSpec
from tickle.testing.localfleet import AgentSpec, LocalFleet

from .conftest import Factory, agent_ctl, eventually, tickle_cli, wait_run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
# contacts reach the NS within half a second: a forgotten computer's task server learns it fast
FAST_CONTACTS = ["--contact-report-interval-s", "0.5"]


async def _run(fleet: LocalFleet, create: RunCreate) -> RunOut:
    async with fleet.client() as ns:
        run = await ns.run_now(create)
    return await wait_run(fleet, run.id, 30)


async def test_runs_are_listed_newest_first_filtered_and_paged(fleet_factory: Factory) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("a1", ["ts1"]), AgentSpec("a2", ["ts1"])])
    async with fleet.client() as ns:
        ok = await ns.add_task(TaskCreate(name="ok", command=["true"], timeout_s=30))
        bad = await ns.add_task(TaskCreate(name="bad", command=["false"], timeout_s=30))
    first = await _run(fleet, RunCreate(task_id=ok.id, computers=["a1", "a2"]))
    second = await _run(fleet, RunCreate(task_id=bad.id, computers=["a1"]))
    third = await _run(fleet, RunCreate(task_id=ok.id, computers=["a2"]))
    adhoc = await _run(
        fleet, RunCreate(task=TaskSpec(name="adhoc", command=["echo", "hi"]), computers=["a1"])
    )
    assert adhoc.executions[0].status == "succeeded"
    assert "hi" in (adhoc.executions[0].output_tail or "")

    async with fleet.client() as ns:
        everything = await ns.runs()
        assert [r.id for r in everything.runs] == [adhoc.id, third.id, second.id, first.id]
        assert everything.next_before is None
        by_id = {r.id: r for r in everything.runs}
        assert (by_id[first.id].label, by_id[first.id].executions) == ("ok", 2)
        assert by_id[first.id].statuses == {"succeeded": 2}
        assert by_id[second.id].statuses == {"failed": 1}
        assert (by_id[adhoc.id].label, by_id[adhoc.id].task_id) == ("adhoc", None)
        # an ad-hoc command is no defined task: nothing piles up
        assert [t.name for t in await ns.tasks()] == ["ok", "bad"]

        assert [r.id for r in (await ns.runs(status="failed")).runs] == [second.id]
        assert [r.id for r in (await ns.runs(computer="a2")).runs] == [third.id, first.id]
        assert [r.id for r in (await ns.runs(task_id=ok.id)).runs] == [third.id, first.id]
        assert [r.id for r in (await ns.runs(computer="a2", status="failed")).runs] == []
        # ISO 8601 keeps microseconds: round down, or `since` may fall just after the third run
        at = datetime.fromtimestamp(third.created_at, UTC)
        if at.timestamp() > third.created_at:
            at -= timedelta(microseconds=1)
        since = at.isoformat()
        assert [r.id for r in (await ns.runs(since=since)).runs] == [adhoc.id, third.id]
        assert [r.id for r in (await ns.runs(until=since)).runs] == [second.id, first.id]

        page1 = await ns.runs(limit=3)
        assert [r.id for r in page1.runs] == [adhoc.id, third.id, second.id]
        assert page1.next_before == second.id
        page2 = await ns.runs(limit=3, before=page1.next_before)
        assert ([r.id for r in page2.runs], page2.next_before) == ([first.id], None)

    listed = tickle_cli(fleet, "runs", "list", "--computer", "a2", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [r["id"] for r in json.loads(listed.stdout)["runs"]] == [third.id, first.id]
    table = tickle_cli(fleet, "runs", "list", "--limit", "2", "--since", "1h")
    assert table.returncode == 0, table.stderr
    assert f"--before {third.id}" in table.stdout
    wrong = tickle_cli(fleet, "runs", "list", "--since", "yesterday")
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == (
        "tickle: --since: 'yesterday' is neither ISO 8601 nor a duration like 2h"
    )
    # the CLI's ad-hoc command leaves no task behind either
    once = tickle_cli(fleet, "run", "--command", "echo once", "a2", "--json")
    assert once.returncode == 0, once.stderr
    async with fleet.client() as ns:
        assert [t.name for t in await ns.tasks()] == ["ok", "bad"]


async def test_a_computers_executions_newest_first_in_pages(fleet_factory: Factory) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("a1", ["ts1"]), AgentSpec("a2", ["ts1"])])
    async with fleet.client() as ns:
        ok = await ns.add_task(TaskCreate(name="ok", command=["true"], timeout_s=30))
        bad = await ns.add_task(TaskCreate(name="bad", command=["false"], timeout_s=30))
    runs = [
        await _run(fleet, RunCreate(task_id=ok.id, computers=["a1", "a2"])),
        await _run(fleet, RunCreate(task_id=bad.id, computers=["a1"])),
        await _run(fleet, RunCreate(task_id=ok.id, computers=["a2"])),
    ]
    mine = [e.id for r in reversed(runs) for e in r.executions if e.computer == "a1"]
    async with fleet.client() as ns:
        history = await ns.computer_executions("a1")
        assert [e.id for e in history.executions] == mine
        assert [e.status for e in history.executions] == ["failed", "succeeded"]
        assert all(e.computer == "a1" for e in history.executions)
        page = await ns.computer_executions("a1", limit=1)
        assert ([e.id for e in page.executions], page.next_before) == (mine[:1], mine[0])
        rest = await ns.computer_executions("a1", limit=1, before=page.next_before)
        assert ([e.id for e in rest.executions], rest.next_before) == (mine[1:], None)
        failed = await ns.computer_executions("a1", status="failed")
        assert [e.id for e in failed.executions] == mine[:1]
        with pytest.raises(ConsoleError, match="404: computer 'nobody' is not known"):
            await ns.computer_executions("nobody")
    shown = tickle_cli(fleet, "history", "--computer", "a1", "--json")
    assert shown.returncode == 0, shown.stderr
    assert [e["id"] for e in json.loads(shown.stdout)["executions"]] == mine
    one = tickle_cli(fleet, "executions", "show", str(mine[0]))
    assert one.returncode == 0, one.stderr
    assert f"execution {mine[0]} on a1: failed" in one.stdout


async def test_deleting_tasks_and_jobs_keeps_their_history_and_is_refused_while_in_use(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("a1", ["ts1"]), AgentSpec("gone", ["ts1"])])
    async with fleet.client() as ns:
        step = await ns.add_task(TaskCreate(name="step", command=["true"], timeout_s=30))
        job = await ns.add_job(JobCreate(name="both", task_ids=[step.id, step.id]))
    task_run = await _run(fleet, RunCreate(task_id=step.id, computers=["a1"]))
    job_run = await _run(fleet, RunCreate(job_id=job.id, computers=["a1"]))
    fleet.kill("gone")  # work for it stays unfinished
    async with fleet.client() as ns:
        with pytest.raises(
            ConsoleError, match=r"409: task \d+ \(step\) is a step of job\(s\) both"
        ):
            await ns.delete_task(step.id)
        pending = await ns.run_now(RunCreate(job_id=job.id, computers=["gone"]))
        with pytest.raises(ConsoleError, match=rf"409: job {job.id} \(both\) has unfinished"):
            await ns.delete_job(job.id)
        with pytest.raises(ConsoleError, match="409: computer gone has unfinished executions"):
            await ns.forget_computer("gone")
    assert pending.executions[0].status == "pending"

    other = await _cli_ok(fleet, "task", "add", "other", "--command", "true")
    assert "defined" in other
    async with fleet.client() as ns:
        other_id = next(t.id for t in await ns.tasks() if t.name == "other")
    assert await _cli_ok(fleet, "task", "delete", str(other_id)) == f"task {other_id} deleted"
    async with fleet.client() as ns:
        assert [t.name for t in await ns.tasks()] == ["step"]
        with pytest.raises(ConsoleError, match=f"404: task {other_id} does not exist"):
            await ns.delete_task(other_id)
        # the history stays, named, after its task is gone
        assert (await ns.run(task_run.id)).label == "step"
        assert (await ns.runs(task_id=step.id)).runs[0].id == task_run.id
        assert {r.id: r.label for r in (await ns.runs()).runs}[job_run.id] == "both"


async def test_a_forgotten_computer_loses_its_credentials_keeps_its_history_and_registers_anew(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(
        ["ts1"], [AgentSpec("a1", ["ts1"], groups=["web"])], ts_extra=FAST_CONTACTS
    )
    async with fleet.client() as ns:
        t = await ns.add_task(TaskCreate(name="t", command=["true"], timeout_s=30))
    done = await _run(fleet, RunCreate(task_id=t.id, computers=["a1"]))
    assert await _cli_ok(fleet, "computers", "forget", "a1") == "computer a1 forgotten"
    async with fleet.client() as ns:
        assert [c.name for c in await ns.computers()] == []
        with pytest.raises(ConsoleError, match="404: unknown computer"):
            await ns.run_now(RunCreate(task_id=t.id, computers=["a1"]))
        with pytest.raises(ConsoleError, match="404: no computer in group"):
            await ns.run_now(RunCreate(task_id=t.id, groups=["web"]))
        history = await ns.computer_executions("a1")
        assert [e.id for e in history.executions] == [done.executions[0].id]

    async def registered_again() -> bool:
        # each contact: the first tells the task server (via its contact report) that the NS
        # forgot a1, which drops a1's token; the next is refused and the agent registers anew
        agent_ctl(fleet, "a1", "check-now")
        async with fleet.client() as ns:
            return [c.name for c in await ns.computers()] == ["a1"]

    forgot_at = time.monotonic()
    await eventually(registered_again, 20, "a1 to register again as a new computer", every_s=0.5)
    took_s = time.monotonic() - forgot_at
    assert "registering again" in fleet.log_tail("a1", 200)
    record(
        case="Forgotten computer's credentials",
        done="tickle computers forget a1 while its agent runs, then its agent's contacts",
        outcome=f"its token refused (401) once its task server learned it, {took_s:.1f} s later;"
        " it registered again as a new computer; its history kept",
        command="pytest tests/integration/test_history.py",
    )
    again = await _run(fleet, RunCreate(task_id=t.id, computers=["a1"]))
    assert again.executions[0].status == "succeeded"


async def test_deleting_a_task_server_refused_while_it_serves_computers_unless_forced(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(["ts1", "ts2"], [AgentSpec("b1", ["ts2"])])
    fleet.kill("ts2")  # decommissioned: stopped first
    async with fleet.client() as ns:
        with pytest.raises(ConsoleError, match="409: task server ts2 still serves 1 computer"):
            await ns.delete_task_server("ts2")
    deleted = tickle_cli(fleet, "task-servers", "delete", "ts2", "--force")
    assert (deleted.returncode, deleted.stdout.strip()) == (0, "task server ts2 deleted")
    async with fleet.client() as ns:
        assert [s.name for s in await ns.task_servers()] == ["ts1"]
        # its computer stays, with no task server, until its agent registers elsewhere
        assert [(c.name, c.task_server) for c in await ns.computers()] == [("b1", None)]
        with pytest.raises(ConsoleError, match="404: task server 'ts2' is not registered"):
            await ns.delete_task_server("ts2")
        with pytest.raises(ConsoleError, match="404: task server 'nope' is not registered"):
            await ns.delete_task_server("nope")
    assert tickle_cli(fleet, "task-servers", "delete", "ts1").returncode == 0  # serves nobody


async def _cli_ok(fleet: LocalFleet, *argv: str) -> str:
    done = tickle_cli(fleet, *argv)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
