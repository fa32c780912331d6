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

Usage: bench/micro.py [--agents N] [--rounds R] [--out FILE]; writes FILE (default
bench/results/micro.json) and prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

from tickle.metrics import ComponentMetrics
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


async def best_us(bench: Callable[[int], Awaitable[float]], agents: int, rounds: int) -> float:
    return min([await bench(agents) for _ in range(rounds)]) / agents * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=2500, help="agents per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; the best counts")
    parser.add_argument("--out", type=Path, default=RESULTS / "micro.json", help="the JSON written")
    args = parser.parse_args()
    if args.agents < 1 or args.rounds < 1:
        parser.error("--agents and --rounds: at least 1")
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
    out = {"agents": args.agents, "rounds": args.rounds, "cpu_us_per_agent": figures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for name, us in figures.items():
        print(f"{name}: {us:.2f} CPU-µs per agent (best of {args.rounds} rounds of {args.agents})")
    print(f"(in {args.out})", file=sys.stderr)


if __name__ == "__main__":
    main()
