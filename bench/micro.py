"""Micro-benchmarks of the task server's per-agent work in a run-now's fan-out (S5).

`make bench` measures whole runs on a shared 2-core host whose speed swings by a third within
minutes: a change worth a few percent of a pull's CPU is lost in that noise (alternated runs of
the same code differ more). These time one piece each, in this process on uvloop (as the task
server runs), the best of several rounds (the least disturbed), per agent:

- state_reports: what a first pull tells the NS of its agent (its clock, its reachability, its
  contact), queued in the `StateReporter` until the next post (not posted);
- tickle_flights: a windowed `Tickler` (the task server's window and rate) sending its first
  tickles to N agents (a real UDP socket on 127.0.0.1 that reads nothing) and each acknowledged
  by its pull: its place in the window, its pace, its HMAC'd datagram, its wait for the ack
  and its end.

And the NS's two transactions a run-now waits for (S1), each after an idle gap as an operator's
run-now finds the NS (cold: the gap costs them two to three times their warm time), on SQLite:
the median wall time of the store's calls, a run-now on one computer (its run, execution and
audit row) and the task server's work pull the tickle causes (its stamps, its work and cancels);
each run is finished after its pull.

Usage: bench/micro.py [--agents N] [--rounds R] [--samples S] [--gap-ms G] [--out FILE]; writes
FILE (default bench/results/micro.json) and prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

from tickle import agentapi
from tickle import messages as m
from tickle.metrics import ComponentMetrics
from tickle.ns.credentials import token_sha256
from tickle.ns.stores import Stores
from tickle.taskserver.settings import TaskServerSettings
from tickle.taskserver.state_reporter import StateReporter
from tickle.tickling import PullsDue, Tickler

RESULTS = Path(__file__).resolve().parent / "results"
KEY = b"k" * 32


class _NoNs:
    """The NS client a reporter that never posts needs."""

    def on_back(self, callback: Callable[[], None]) -> None:
        pass


async def state_reports(agents: int) -> float:
    reporter = StateReporter(_NoNs())  # type: ignore[arg-type]  # never posts: no NS needed
    names = [f"pc{i}" for i in range(agents)]
    started = time.process_time()
    for name in names:
        reporter.note(name, time.time(), clock_offset_s=0.001)
        reporter.tickle_state(name, "reachable")
        reporter.contact(name, 3)
    reporter.flush_contacts()
    return time.process_time() - started


async def tickle_flights(agents: int) -> float:
    field = TaskServerSettings.model_fields
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    addr = sink.getsockname()
    sent: asyncio.Queue[str] = asyncio.Queue()
    ended: list[str] = []
    all_ended = asyncio.Event()

    def reachable(name: str) -> None:  # called as each flight ends, acknowledged
        ended.append(name)
        if len(ended) == agents:
            all_ended.set()

    tickler = Tickler(
        "ts1",
        lambda name: KEY,
        ComponentMetrics("bench"),
        rate=field["agent_tickle_rate"].default,
        window=field["agent_tickle_window"].default,
        reads_after_ack=True,
        pulls_due=PullsDue(),
        on_sent=lambda name, kind, at: sent.put_nowait(name),
        on_reachable=reachable,
    )
    await tickler.start(("127.0.0.1", 0))
    try:
        started = time.process_time()
        for i in range(agents):
            tickler.tickle(f"pc{i}", addr)
        for _ in range(agents):  # each pulls once its tickle left
            tickler.ack(await sent.get())
        await all_ended.wait()
        return time.process_time() - started
    finally:
        await tickler.close()
        sink.close()


BENCHES: dict[str, Callable[[int], Awaitable[float]]] = {
    "state_reports": state_reports,
    "tickle_flights": tickle_flights,
}


def ns_transactions(samples: int, gap_s: float) -> dict[str, float]:
    """The median ms of a run-now's store call and of its work pull's, each after `gap_s` idle."""
    times: dict[str, list[float]] = {"run_now": [], "work_pull": []}
    with tempfile.TemporaryDirectory() as tmp:
        stores = Stores.open(f"sqlite:///{Path(tmp) / 'ns.db'}")
        try:
            stores.database.migrate()
            register = m.TaskServerRegister(
                enrollment_secret="x" * 16, name="ts1", tickle_host="127.0.0.1", tickle_port=9,
                api_url="http://127.0.0.1:9",
            )  # fmt: skip
            token = stores.inventory.register_task_server(register, "ns").token
            ts = stores.inventory.caller_for(token_sha256(token))
            assert ts is not None
            stores.inventory.register_agent(ts, m.AgentRegistration(name="pc1"))
            task = stores.catalog.create_task(m.TaskCreate(name="t", command=["true"]))
            body = m.RunCreate(task_id=task.id, computers=["pc1"])

            def audit(conn: Any, run: m.RunOut) -> None:  # as the operator's run-now does
                detail = {"computers": ["pc1"], "executions": len(run.executions)}
                stores.audit.insert(conn, "bench", "run", f"run {run.id}: t", detail)

            for _ in range(samples):
                time.sleep(gap_s)
                started = time.perf_counter()
                run = stores.delivery.create_run(body, audit)
                times["run_now"].append(time.perf_counter() - started)
                time.sleep(gap_s)
                started = time.perf_counter()
                stores.delivery.pull_work(ts, time.time(), "tickle", time.time())
                times["work_pull"].append(time.perf_counter() - started)
                (execution,) = run.executions
                finished = agentapi.StatusEvent(
                    event_id=uuid.uuid4().hex, execution_id=execution.id, computer="pc1",
                    kind="finished", at=time.time(), status="succeeded", exit_code=0,
                )  # fmt: skip
                stores.delivery.record_events(ts, [finished], time.time())
        finally:
            stores.close()
    return {name: round(statistics.median(ts) * 1000, 3) for name, ts in times.items()}


async def best_us(bench: Callable[[int], Awaitable[float]], agents: int, rounds: int) -> float:
    return min([await bench(agents) for _ in range(rounds)]) / agents * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=2500, help="agents per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the best counts")
    parser.add_argument("--samples", type=int, default=50, help="NS transactions timed")
    parser.add_argument("--gap-ms", type=float, default=100.0, help="idle before each")
    parser.add_argument("--out", type=Path, default=RESULTS / "micro.json", help="the JSON written")
    args = parser.parse_args()
    if args.agents < 1 or args.rounds < 1 or args.samples < 1:
        parser.error("--agents, --rounds and --samples: at least 1")
    if args.gap_ms < 0:
        parser.error("--gap-ms: not below 0")
    figures = {
        # on uvloop, as the task server runs
        name: round(
            asyncio.run(
                best_us(bench, args.agents, args.rounds), loop_factory=uvloop.new_event_loop
            ),
            2,
        )
        for name, bench in BENCHES.items()
    }
    cold = ns_transactions(args.samples, args.gap_ms / 1000)
    out = {
        "agents": args.agents,
        "rounds": args.rounds,
        "cpu_us_per_agent": figures,
        "samples": args.samples,
        "gap_ms": args.gap_ms,
        "ns_cold_ms": cold,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for name, us in figures.items():
        print(f"{name}: {us:.2f} CPU-µs per agent (best of {args.rounds} rounds of {args.agents})")
    for name, ms in cold.items():
        print(
            f"ns {name}: {ms:.3f} ms (median of {args.samples}, {args.gap_ms:g} ms idle before each)"
        )
    print(f"(in {args.out})", file=sys.stderr)


if __name__ == "__main__":
    main()
