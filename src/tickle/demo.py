"""`make demo`: a loopback fleet shows the nine steps, then the blocked-tickle and CEM paths.

Starts an NS, two task servers and six agents as real processes on 127.0.0.N with the default
ports, runs a task now on every normal agent and prints each one's timeline, then shows an agent
whose tickles are dropped getting its task by polling, and a CEM agent that only polls. Stops
everything it started. With `--console` (`make demo CONSOLE=1`) it then prints the web console's
address and the login token and keeps the fleet running until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.rule import Rule

from tickle import console as con
from tickle.messages import (
    FINAL_STATUSES,
    TASK_REQUEST_INTERVAL_MIN_S,
    RunCreate,
    RunOut,
    SettingsUpdate,
    TaskCreate,
)
from tickle.testing.localfleet import AgentSpec, FleetError, LocalFleet

out = Console(width=max(Console().width, 150))
NORMAL = ["computer-a", "computer-b", "computer-c", "computer-d"]
BLOCKED = "computer-blocked"
CEM = "computer-cem"
SHORT_INTERVAL_S = TASK_REQUEST_INTERVAL_MIN_S


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 when every path delivered its task."""
    args = sys.argv[1:] if argv is None else argv
    unknown = [a for a in args if a != "--console"]
    if unknown:
        out.print(f"demo: unknown option {unknown[0]} (the one option is --console)")
        return 2
    with tempfile.TemporaryDirectory(prefix="tickle-demo-") as tmp:
        try:
            return asyncio.run(_demo(Path(tmp), console="--console" in args))
        except FleetError as exc:
            out.print(f"[red]demo: the fleet did not start: {exc}[/red]")
            return 1
        except KeyboardInterrupt:  # Ctrl-C while the console was kept open: the fleet is stopped
            return 0


async def _demo(root: Path, console: bool = False) -> int:
    agents = [
        AgentSpec(NORMAL[0], ["ts1"]),
        AgentSpec(NORMAL[1], ["ts1"]),
        AgentSpec(NORMAL[2], ["ts2"]),
        AgentSpec(NORMAL[3], ["ts2"]),
        AgentSpec(BLOCKED, ["ts1"], blocked=True),
        AgentSpec(CEM, ["ts2"], cem=True),
    ]
    fleet = LocalFleet(root, ["ts1", "ts2"], agents)
    out.print(Rule("Tickle demo: a local fleet on loopback"))
    out.print(f"starting the NS at {fleet.ns_url}, task servers {fleet.ts_hosts}, six agents")
    started = time.monotonic()
    try:
        await fleet.start()
        out.print(f"fleet up in {time.monotonic() - started:.1f}s (logs in {root})")
        async with fleet.client() as ns:
            ok = await _paths(fleet, ns)
        if console:
            await _keep_console_open(fleet)
    finally:
        await fleet.stop()
    out.print(Rule("done" if ok else "[red]a path failed[/red]"))
    return 0 if ok else 1


async def _paths(fleet: LocalFleet, ns: con.NsClient) -> bool:
    settings = await ns.settings()
    out.print(f"Task Request Interval: {settings.task_request_interval_s}s (the default)")
    out.print(con.task_servers_table(await ns.task_servers()))

    out.print(Rule("1. Tickle delivery: run now on four agents"))
    task = await ns.add_task(TaskCreate(name="hello", command=["hostname"], timeout_s=30))
    run = await _run_and_watch(ns, RunCreate(task_id=task.id, computers=NORMAL), 30)
    out.print(con.run_table(run, wide=True))
    out.print(con.timeline_table(run.executions[0]))
    delivered = all(e.status == "succeeded" and e.via == "tickle" for e in run.executions)
    out.print(
        f"every agent ran it within {_slowest_ms(run):.0f} ms of run-now, with a "
        f"{settings.task_request_interval_s}s poll interval: only tickles explain that"
    )

    out.print(Rule("2. Blocked tickles: the agent gets its task on its next poll"))
    await ns.update_settings(
        SettingsUpdate(task_request_interval_s=SHORT_INTERVAL_S, poll_jitter_fraction=0.1)
    )
    out.print(f"Task Request Interval set centrally to {SHORT_INTERVAL_S}s")
    out.print(
        f"{BLOCKED} and {CEM} miss the settings tickle (it is dropped / never sent): they take "
        "the new interval at their next contact; a policy refresh is such a contact"
    )
    await _agent_ctl(fleet, BLOCKED, "policy-refresh")
    await _agent_ctl(fleet, CEM, "policy-refresh")
    run = await _run_and_watch(ns, RunCreate(task_id=task.id, computers=[BLOCKED]), 60)
    out.print(con.run_table(run, wide=True))
    computers = {c.name: c for c in await ns.computers()}
    out.print("waiting for the task server's last tickle try to the blocked agent...")
    deadline = time.monotonic() + 40
    while computers[BLOCKED].tickle_state != "unreachable" and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        computers = {c.name: c for c in await ns.computers()}
    blocked = run.executions[0].status == "succeeded" and run.executions[0].via == "poll"
    out.print(f"{BLOCKED}: arrived by {run.executions[0].via}; NS shows it "
              f"tickle-{computers[BLOCKED].tickle_state}")  # fmt: skip

    out.print(Rule("3. CEM mode: no tickle listener, work arrives by polling"))
    run = await _run_and_watch(ns, RunCreate(task_id=task.id, computers=[CEM]), 60)
    out.print(con.run_table(run, wide=True))
    cem = run.executions[0].status == "succeeded" and run.executions[0].via == "poll"
    out.print(con.computers_table(await ns.computers()))
    return delivered and blocked and cem


async def _keep_console_open(fleet: LocalFleet) -> None:
    out.print(Rule("Web console"))
    out.print(f"console: {fleet.ns_url}/console/  (API docs: {fleet.ns_url}/docs)")
    out.print("log in with the admin token:")
    out.print(fleet.admin_token, markup=False, highlight=False, soft_wrap=True)
    out.print("the fleet keeps running until Ctrl-C")
    await asyncio.Event().wait()  # until Ctrl-C cancels it


async def _run_and_watch(ns: con.NsClient, create: RunCreate, deadline_s: float) -> RunOut:
    run = await ns.run_now(create)
    with con.progress_bar(out) as progress:
        run = await ns.wait_run(run.id, deadline_s, progress)
    if any(e.status not in FINAL_STATUSES for e in run.executions):
        out.print(f"[red]run {run.id} did not finish within {deadline_s}s[/red]")
    return run


def _slowest_ms(run: RunOut) -> float:
    worst = 0.0
    for e in run.executions:
        times = con.timeline_times(e)
        if times.get("recorded") and times.get("created"):
            worst = max(worst, (times["recorded"] or 0) - (times["created"] or 0))
    return worst * 1000


async def _agent_ctl(fleet: LocalFleet, name: str, action: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tickle", "agent", action,
        "--state-dir", str(fleet.root / name),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await proc.communicate()
    out.print(f"$ tickle agent {action}  # on {name}: exit {proc.returncode}")
    if proc.returncode:
        out.print(output.decode(errors="replace"))


if __name__ == "__main__":
    sys.exit(main())
