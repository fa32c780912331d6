"""`make bench`: run-now → recorded latency per hop, and a run-now on 1,000 agents.

Writes the figures to bench/results/latest.md and prints them. Everything runs on loopback.
Options: --runs N (default 200), --agents N (default 1000), --skip-latency, --skip-fleet,
--long-polls N (default 10000), --skip-longpoll, --only longpoll (its part alone: bench/longpoll.py).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import longpoll  # bench/longpoll.py, beside this file

from tickle.console import timeline_times
from tickle.messages import FINAL_STATUSES, TIMELINE_STEPS, ExecutionOut, RunCreate, TaskCreate
from tickle.testing.localfleet import TS_API_PORT, AgentSpec, LocalFleet

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "latest.md"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def hop_rows(executions: list[ExecutionOut]) -> list[str]:
    """p50/p99 of each hop (ms), from consecutive timeline steps."""
    rows = []
    for a, b in itertools.pairwise(TIMELINE_STEPS):
        deltas = []
        for e in executions:
            t = timeline_times(e)
            if t.get(a) is not None and t.get(b) is not None:
                deltas.append(((t[b] or 0) - (t[a] or 0)) * 1000)
        if deltas:
            rows.append(f"| {a} → {b} | {statistics.median(deltas):.2f} | {pct(deltas, 99):.2f} |")
    return rows


async def latency(root: Path, runs: int) -> list[str]:
    fleet = LocalFleet(root, ["ts1"], [AgentSpec("bench-agent", ["ts1"])], net="127.0.9")
    await fleet.start()
    executions: list[ExecutionOut] = []
    try:
        async with fleet.client() as ns:
            task = await ns.add_task(TaskCreate(name="bench-true", command=["true"]))
            for _ in range(runs):
                run = await ns.run_now(RunCreate(task_id=task.id, computers=["bench-agent"]))
                deadline = time.monotonic() + 30
                while True:
                    run = await ns.run(run.id)
                    if run.executions[0].status in FINAL_STATUSES or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.002)
                executions.append(run.executions[0])
    finally:
        await fleet.stop()
    ok = [e for e in executions if e.status == "succeeded"]
    totals = []
    for e in ok:
        t = timeline_times(e)
        if t.get("recorded") and t.get("created"):
            totals.append(((t["recorded"] or 0) - (t["created"] or 0)) * 1000)
    return [
        f"## Run-now → recorded, one agent, {runs} sequential runs",
        "",
        f"succeeded: {len(ok)}/{runs}; via tickle: {sum(e.via == 'tickle' for e in ok)}",
        "",
        f"run-now → recorded: p50 {statistics.median(totals):.2f} ms, p99 {pct(totals, 99):.2f} ms, "
        f"max {max(totals):.2f} ms",
        "",
        "| hop | p50 (ms) | p99 (ms) |",
        "|---|---|---|",
        *hop_rows(ok),
    ]


async def fleet_run(root: Path, agents: int, per_process: int = 250) -> list[str]:
    fleet = LocalFleet(root, ["ts1", "ts2"], [], net="127.0.8")
    await fleet.start()
    sims: list[subprocess.Popen[str]] = []
    try:
        started = time.monotonic()
        for i, first in enumerate(range(0, agents, per_process)):
            ts = ["ts1", "ts2"][i % 2]
            url = f"http://{fleet.ts_hosts[ts]}:{TS_API_PORT}"
            count = min(per_process, agents - first)
            sims.append(subprocess.Popen(
                [sys.executable, str(HERE / "simagents.py"), url, str(first), str(count),
                 "127.2"],
                stdout=subprocess.PIPE, text=True,
                env={**os.environ, "TICKLE_AGENT_ENROLLMENT_SECRET": fleet.agent_enrollment_secret},
            ))  # fmt: skip
        for sim in sims:
            assert sim.stdout is not None
            line = await asyncio.to_thread(sim.stdout.readline)
            if not line.startswith("ready"):
                raise RuntimeError(f"simulated agents failed to start: {line!r}")
        setup_s = time.monotonic() - started
        names = [f"sim-{i:05d}" for i in range(agents)]
        async with fleet.client() as ns:
            task = await ns.add_task(TaskCreate(name="bench-fleet", command=["true"]))
            t0 = time.monotonic()
            run = await ns.run_now(RunCreate(task_id=task.id, computers=names))
            accepted_s = time.monotonic() - t0
            deadline = t0 + 300
            while True:
                run = await ns.run(run.id)
                done = sum(e.status in FINAL_STATUSES for e in run.executions)
                if done == agents or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            wall_s = time.monotonic() - t0
    finally:
        for sim in sims:
            sim.terminate()
        for sim in sims:
            sim.wait(10)
        await fleet.stop()
    recorded = []
    for e in run.executions:
        t = timeline_times(e)
        if t.get("recorded") and t.get("created"):
            recorded.append((t["recorded"] or 0) - (t["created"] or 0))
    return [
        f"## Run-now on {agents} agents over 2 task servers "
        f"({len(sims)} simulator processes, real UDP listeners and HTTP clients)",
        "",
        f"agents registered in {setup_s:.1f} s; run-now accepted in {accepted_s * 1000:.0f} ms",
        f"all {done}/{agents} status events recorded {wall_s:.2f} s after run-now "
        f"(per execution p50 {statistics.median(recorded):.2f} s, p99 {pct(recorded, 99):.2f} s)",
        "",
        "| hop | p50 (ms) | p99 (ms) |",
        "|---|---|---|",
        *hop_rows(run.executions),
    ]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-fleet", action="store_true")
    parser.add_argument("--long-polls", type=int, default=10_000)
    parser.add_argument("--skip-longpoll", action="store_true")
    parser.add_argument("--only", choices=["longpoll"], default=None)
    args = parser.parse_args()
    if args.only == "longpoll":
        args.skip_latency = args.skip_fleet = True
    lines = [f"# Tickle benchmarks ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", ""]
    with tempfile.TemporaryDirectory(prefix="tickle-bench-") as tmp:
        if not args.skip_latency:
            lines += await latency(Path(tmp) / "latency", args.runs) + [""]
        if not args.skip_fleet:
            lines += await fleet_run(Path(tmp) / "fleet", args.agents) + [""]
        if not args.skip_longpoll:
            lines += await longpoll.measure(Path(tmp) / "longpoll", args.long_polls) + [""]
    text = "\n".join(lines)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")
    print(text)
    print(f"(written to {RESULTS})")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
