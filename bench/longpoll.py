"""`make bench` (or `bench/run.py --only longpoll`): one task server holding 10,000 waiting
long-polls.

A real NS and task server (LocalFleet, loopback). 10,000 simulated CEM agents in this one process
(aiohttp; each registers over HTTP, then holds its long-poll open on a connection of its own)
turn the NS's `long_poll` setting on and wait. Measured: the task server's RSS and CPU while they
all wait, and, when a run-now for all of them arrives, the time until every long-poll is answered
with its work.

Run alone: python bench/longpoll.py [--clients N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from tickle import http
from tickle.messages import (
    AgentEnrollment,
    AgentPolicy,
    AgentRegister,
    AgentTasks,
    RunCreate,
    SettingsUpdate,
    TaskCreate,
)
from tickle.serving import raise_open_file_limit
from tickle.testing.localfleet import LocalFleet

# connections per local address: well within the ephemeral ports of one (source, destination)
PER_ADDRESS = 2_000
REGISTERING_AT_ONCE = 64
ARMING_AT_ONCE = 1_000
IDLE_WINDOW_S = 10.0
LONG_POLL_TIMEOUT_S = 300  # the bench's: no long-poll returns empty while it is measured


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds process `pid` has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def gauge(session: aiohttp.ClientSession, ts_url: str, name: str) -> float:
    # a fresh connection each time: an idle kept-alive one may be closed for the long-polls'
    async with session.get(ts_url + "/metrics", headers={"Connection": "close"}) as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


class Clients:
    """N simulated CEM agents: their tokens and their long-polls."""

    def __init__(self, ts_url: str, secret: str, count: int) -> None:
        self.ts_url = ts_url
        self.secret = secret
        self.names = [f"lp-{i:05d}" for i in range(count)]
        self.tokens: dict[str, str] = {}
        self.answered: dict[str, float] = {}  # name: monotonic time its work came
        self.errors: list[str] = []  # long-polls that failed, then were armed again
        # a session per local address, each connection its own (limit 0: no pool cap)
        self.sessions = [
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, local_addr=(f"127.3.{i // 250}.{1 + i % 250}", 0)
                ),
                timeout=aiohttp.ClientTimeout(total=LONG_POLL_TIMEOUT_S + 60),
            )
            for i in range((count + PER_ADDRESS - 1) // PER_ADDRESS)
        ]

    async def close(self) -> None:
        for s in self.sessions:
            await s.close()

    async def register(self) -> AgentEnrollment:
        gate = asyncio.Semaphore(REGISTERING_AT_ONCE)
        last: list[AgentEnrollment] = []

        async def one(i: int, name: str) -> None:
            async with gate:
                enrollment: AgentEnrollment = await http.request(
                    self.sessions[i // PER_ADDRESS], "POST", self.ts_url + "/api/agent/register",
                    body=AgentRegister(enrollment_secret=self.secret, name=name, cem=True),
                    answer=AgentEnrollment,
                )  # fmt: skip
            self.tokens[name] = enrollment.token
            last[:] = [enrollment]

        await asyncio.gather(*(one(i, n) for i, n in enumerate(self.names)))
        return last[0]

    async def long_poll(self, i: int, name: str) -> None:
        """Hold the long-poll until work comes (re-armed after an empty answer, and 1 s after a
        failure, as an agent does)."""
        session = self.sessions[i // PER_ADDRESS]
        while True:
            try:
                answer = await http.request(
                    session, "GET", self.ts_url + "/api/agent/tasks/wait", answer=AgentTasks,
                    token=self.tokens[name],
                )  # fmt: skip
            except (aiohttp.ClientError, OSError, TimeoutError, http.ApiError) as exc:
                self.errors.append(f"{name}: {type(exc).__name__} {exc}")
                await asyncio.sleep(1.0)
                continue
            if answer is not None and answer.executions:
                self.answered[name] = time.monotonic()
                return


async def _wait_for(probe: Callable[[], Awaitable[bool]], what: str, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while not await probe():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {deadline_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


async def measure(root: Path, count: int = 10_000) -> list[str]:
    """The figures, as Markdown lines."""
    raise_open_file_limit()
    fleet = LocalFleet(root, ["ts1"], [], net="127.0.7")
    await fleet.start()
    ts_url = fleet.ts_url("ts1")
    assert fleet.procs["ts1"].popen is not None
    pid = fleet.procs["ts1"].popen.pid
    clients = Clients(ts_url, fleet.agent_enrollment_secret, count)
    metrics = aiohttp.ClientSession()
    waiting: list[asyncio.Task[None]] = []
    try:
        async with fleet.client() as ns:
            await ns.update_settings(
                SettingsUpdate(long_poll=True, long_poll_timeout_s=LONG_POLL_TIMEOUT_S)
            )
        t0 = time.monotonic()
        await clients.register()
        registered_s = time.monotonic() - t0

        async def long_poll_on() -> bool:  # the task server has pulled the setting
            policy = await http.request(
                clients.sessions[0], "GET", ts_url + "/api/agent/policy",
                token=clients.tokens[clients.names[0]], answer=AgentPolicy,
            )  # fmt: skip
            return bool(policy.long_poll)

        await _wait_for(long_poll_on, "the long_poll setting at the task server", 60)
        rss_before = rss_mib(pid)
        t0 = time.monotonic()
        # armed ARMING_AT_ONCE at a time: agents re-arm spread out, not in one instant
        for first in range(0, count, ARMING_AT_ONCE):
            waiting += [
                asyncio.create_task(clients.long_poll(i, clients.names[i]))
                for i in range(first, min(count, first + ARMING_AT_ONCE))
            ]

            async def armed(n: int = len(waiting)) -> bool:
                return await gauge(metrics, ts_url, "tickle_long_polls_waiting") >= n

            await _wait_for(armed, f"{len(waiting)} long-polls waiting", 300)
        armed_s = time.monotonic() - t0
        cpu0, idle0 = cpu_s(pid), time.monotonic()
        await asyncio.sleep(IDLE_WINDOW_S)
        idle_cpu = (cpu_s(pid) - cpu0) / (time.monotonic() - idle0) * 100
        rss_waiting = rss_mib(pid)

        woken_before = await gauge(metrics, ts_url, "tickle_long_polls_woken_total")
        async with fleet.client() as ns:
            task = await ns.add_task(TaskCreate(name="bench-longpoll", command=["true"]))
            t0 = time.monotonic()
            await ns.run_now(RunCreate(task_id=task.id, computers=clients.names))
            accepted_s = time.monotonic() - t0
        await asyncio.wait(waiting, timeout=LONG_POLL_TIMEOUT_S)
        if len(clients.answered) < count:
            raise RuntimeError(
                f"only {len(clients.answered)}/{count} long-polls got their work"
                + (f"; {clients.errors[-1]}" if clients.errors else "")
            )
        answers = sorted(t - t0 for t in clients.answered.values())
        woken = await gauge(metrics, ts_url, "tickle_long_polls_woken_total") - woken_before
        tickles = await gauge(metrics, ts_url, 'tickle_tickles_sent_total{kind="tasks"}')
    finally:
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        await metrics.close()
        await clients.close()
        await fleet.stop()
    return [
        f"## {count} long-polls waiting at one task server (simulated CEM agents, one process)",
        "",
        f"agents registered in {registered_s:.1f} s; {count} long-polls armed in {armed_s:.1f} s"
        f" ({ARMING_AT_ONCE} at a time; {len(clients.errors)} failed and were armed again)",
        f"task server RSS: {rss_before:.0f} MiB before, {rss_waiting:.0f} MiB with them waiting "
        f"({(rss_waiting - rss_before) * 1024 / count:.1f} KiB each); CPU while they wait: "
        f"{idle_cpu:.1f} % of a core (over {IDLE_WINDOW_S:.0f} s)",
        f"run-now on all {count}: accepted in {accepted_s:.2f} s; every long-poll answered with its"
        f" work {answers[-1]:.2f} s after run-now (first {answers[0]:.2f} s: the NS's tickle and the"
        f" task server's work pull; p50 {statistics.median(answers):.2f} s, p99"
        f" {percentile(answers, 99):.2f} s): all {count} answered within"
        f" {answers[-1] - answers[0]:.2f} s of the first; {woken:.0f} woken, {tickles:.0f} tasks"
        " tickles sent",
    ]


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tickle-bench-") as tmp:
        lines = await measure(Path(tmp), args.clients)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
