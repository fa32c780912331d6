"""Many simulated client task agents in a few processes: for the fleet-scale test and the bench.

Each simulated agent is real on the wire: it registers with its task server over HTTP, binds its
own UDP tickle listener on its own loopback address (port 50124), verifies every tickle with
TickleGuard, pulls its tasks over HTTP when tickled, and posts `started` and `finished` status
events. Only the task itself is simulated (it "succeeds" at once, without spawning a process).
Like the real agent, it backs off when a server is busy (429, 503, or no answer) with the real
agent's own schedules (tickle.agent.retries: full jitter, after what `Retry-After` says): its
registration and its status events are tried again on their schedules, and a failed pull is
left to the next tickle (the task server resends it) or to the agent's retry poll, whichever
comes first. As the real agent's, its pulls do not wait for its events' posts: a tickle that
comes while they are posted is pulled at once. Its HTTP is `tickle.testing.simhttp`'s (a
keep-alive connection, requests built as bytes) and its bodies `tickle.agentapi`'s msgspec
Structs, as the real agent's: aiohttp and pydantic made the simulator a third of S2's CPU.

With `long_poll`, the agents are in CEM mode instead (no tickle listener): each holds a long-poll
open to its task server, as a real CEM agent does when the NS's `long_poll` setting is on, armed
again after each answer, and after a failure on the real agent's schedule (retries.LONG_POLL).

`SimAgents` starts the processes (`python -m tickle.testing.simagents`) for a `LocalFleet`, spread
over its task servers, and waits until every agent is registered and listening. Each process
counts the requests its agents send per tenth of a second, and prints them when stopped
(`SimAgents.stop` returns the fleet's sums), with each agent's `Trace` of its first tickled pull
(`SimAgents.traces`): where an agent's tickle → pull time goes, on the agent's side.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import gc
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from tickle import agentapi, wire
from tickle.agent import retries
from tickle.agentapi import (
    AgentEnrollment,
    AgentRegister,
    AgentTasks,
    EventAck,
    EventBatch,
    StatusEvent,
)
from tickle.backoff import Backoff
from tickle.httpbase import ApiError
from tickle.outbox import new_event_id
from tickle.testing.simhttp import SimHttp

if TYPE_CHECKING:  # a simulator process imports no server stack (fastapi, aiohttp, pydantic)
    from tickle.testing.localfleet import LocalFleet

PER_PROCESS = 250
SECRET_ENV = "TICKLE_SIM_ENROLLMENT_SECRET"  # noqa: S105 - the name of a variable
# how long a simulated agent keeps trying one request (the servers may be busy, or restarting)
GIVE_UP_S = 120.0
BUSY = frozenset({429, 503})
# answers a real agent tries again too (its pull on retries.PULL, its posts on their schedules):
# a server that timed the request out (408: its head came too slowly from a loaded agent) or failed
AGAIN = frozenset({408, 500, 502, 504})
JSON_TYPE = b"Content-Type: application/json\r\n"
B = TypeVar("B", bound=agentapi.Body)


def sim_name(index: int) -> str:
    return f"sim-{index:05d}"


def sim_host(net: str, index: int) -> str:
    """The loopback address of simulated agent `index` under `net` (two octets, "127.N")."""
    return f"{net}.{index // 250}.{index % 250 + 1}"


@dataclass
class Trace:
    """One agent's first tickled pull, as the agent saw it (unix times; None: did not happen),
    and the `tasks` tickles it received in all."""

    name: str
    tickled_at: float | None = None  # the first tasks tickle received
    pull_sent_at: float | None = None  # its pull's first try sent
    pulled_at: float | None = None  # its pull answered
    tickles: int = 0


class SimAgents:
    """Processes of simulated agents for `fleet`, agent i on task server i mod len(task servers)."""

    def __init__(
        self,
        fleet: LocalFleet,
        count: int,
        net: str,
        task_servers: list[str] | None = None,
        per_process: int = PER_PROCESS,
        long_poll: bool = False,
    ) -> None:
        self.fleet = fleet
        self.count = count
        self.net = net
        self.task_servers = task_servers or list(fleet.ts_hosts)
        self.per_process = per_process
        self.long_poll = long_poll
        self.names = [sim_name(i) for i in range(count)]
        self.procs: list[subprocess.Popen[str]] = []
        self.traces: list[Trace] = []  # filled by `stop`

    async def start(self, deadline_s: float = 120.0) -> float:
        """Start the processes; return the seconds until every agent was registered."""
        started = time.monotonic()
        self._spawn()
        end = started + deadline_s
        for proc in self.procs:
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(
                    asyncio.to_thread(proc.stdout.readline), max(0.1, end - time.monotonic())
                )
            except TimeoutError:
                raise RuntimeError(f"simulated agents not registered in {deadline_s}s") from None
            if not line.startswith("ready"):
                # what the process said (`CannotStart`), else how it ended
                why = line.removeprefix("failed ").strip()
                if not why:
                    why = f"the process ended (status {await asyncio.to_thread(proc.wait)})"
                raise RuntimeError(f"simulated agents failed to start: {why}")
        return time.monotonic() - started

    @property
    def pids(self) -> list[int]:
        """The simulator processes' ids."""
        return [p.pid for p in self.procs]

    def _spawn(self) -> None:
        from tickle.testing.localfleet import AGENT_TICKLE_PORT

        env = {**os.environ, SECRET_ENV: self.fleet.agent_enrollment_secret}
        ts_count = len(self.task_servers)
        # each process serves agents of one task server: agent i on task server i mod ts_count
        for t, ts in enumerate(self.task_servers):
            mine = list(range(t, self.count, ts_count))
            for first in range(0, len(mine), self.per_process):
                part = ",".join(map(str, mine[first : first + self.per_process]))
                argv = [sys.executable, "-m", "tickle.testing.simagents", self.fleet.ts_url(ts),
                        self.net, part, str(AGENT_TICKLE_PORT),
                        *(["--long-poll"] if self.long_poll else [])]  # fmt: skip
                self.procs.append(
                    subprocess.Popen(
                        argv, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True
                    )
                )

    async def stop(self) -> Counter[int]:
        """Stop every process; return the requests all agents sent per tenth of a second (keyed
        by unix time * 10, rounded down)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        per_tenth: Counter[int] = Counter()
        for proc in self.procs:
            try:
                out, _ = await asyncio.to_thread(proc.communicate, timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = await asyncio.to_thread(proc.communicate)
            for line in out.splitlines():
                if line.startswith("stats "):
                    per_tenth.update({int(k): v for k, v in json.loads(line[6:]).items()})
                elif line.startswith("trace "):
                    self.traces += [Trace(*t) for t in json.loads(line[6:])]
        self.procs.clear()
        return per_tenth


class CannotStart(Exception):
    """A simulated agent cannot start (said in one line: the bench reports it)."""


class _Busy(Exception):
    def __init__(self, retry_after_s: float | None) -> None:
        self.retry_after_s = retry_after_s


def _retry_after_header(headers: dict[str, str]) -> float | None:
    value = headers.get("retry-after", "")
    return float(value) if value.isdigit() else None


def _check(status: int, headers: dict[str, str], body: bytes, target: str) -> None:
    """`_Busy` for an answer to try again; `ApiError` (with the server's words) for a refusal."""
    if status in BUSY or status in AGAIN:
        raise _Busy(_retry_after_header(headers))
    if status >= 400:
        raise ApiError(status, body.decode(errors="replace")[:200], target)


def _retry_after(exc: BaseException) -> float:
    if isinstance(exc, _Busy) and exc.retry_after_s is not None:
        return exc.retry_after_s
    return 0.0


class SimAgent(asyncio.DatagramProtocol):
    def __init__(
        self,
        name: str,
        host: str,
        ts_url: str,
        sent: Counter[int],
        *,
        tickle_port: int,
        cem: bool = False,
    ) -> None:
        self.name = name
        self.tickle_port = tickle_port
        self.cem = cem
        self.long_poll_timeout_s = 0.0
        self.host = host
        self.ts_url = ts_url
        self.sent = sent
        self.http: SimHttp | None = None
        self.auth = b""  # the Authorization header line, once registered
        self.guard: wire.TickleGuard | None = None
        self.token = ""
        self.seen: set[int] = set()
        self.pulling = False
        self.again = False
        self.tickled = asyncio.Event()  # a tickle arrived while a failed pull waits to retry
        self.pull_failures = 0
        self.trace = Trace(name)
        self._running: set[asyncio.Task[None]] = set()  # runs posting their events
        self._listening: asyncio.DatagramTransport | None = None  # its tickle socket

    async def start(self, secret: str) -> None:
        """Register, then listen for tickles (not in CEM mode: it long-polls)."""
        await self.register(secret)
        if self.cem:
            return
        loop = asyncio.get_running_loop()
        try:
            self._listening, _ = await loop.create_datagram_endpoint(
                lambda: self, local_addr=(self.host, self.tickle_port)
            )
        except OSError as exc:  # uvloop's names the address, its cause the reason
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            why = os.strerror(cause.errno) if cause.errno else str(cause)
            raise CannotStart(
                f"{self.name} cannot listen for tickles on {self.host}:{self.tickle_port}: {why}"
            ) from exc

    async def register(self, secret: str) -> None:
        """Register with the task server (tried again on the agent's schedule)."""
        self.http = SimHttp(self.ts_url, self.host, timeout_s=30.0)
        body = AgentRegister(enrollment_secret=secret, name=self.name, cem=self.cem,
                             tickle_host=None if self.cem else self.host,
                             tickle_port=self.tickle_port, reported_address=self.host)  # fmt: skip
        enrollment = await self.call(
            "POST", "/api/agent/register", body, AgentEnrollment, b"", retries.REGISTER
        )
        self.token = enrollment.token
        self.auth = f"Authorization: Bearer {self.token}\r\n".encode()
        self.long_poll_timeout_s = float(enrollment.policy.long_poll_timeout_s)
        self.guard = wire.TickleGuard({enrollment.ts_name: base64.b64decode(enrollment.tickle_key)})

    async def close(self) -> None:
        if self._listening is not None:
            self._listening.close()
        for run in list(self._running):
            run.cancel()
        if self.http is not None:
            await self.http.close()

    async def call(
        self,
        method: str,
        target: str,
        body: agentapi.Body | None,
        answer: type[B],
        auth: bytes,
        backoff: Backoff | None,
    ) -> B:
        """One request (`target`: path and query; `auth`: its Authorization header line, or
        none), tried again on `backoff` (None: tried once) while the server is busy or away;
        each try counted in the tenth of a second it is sent."""
        assert self.http is not None
        client = self.http
        headers = JSON_TYPE + auth
        data = agentapi.encode(body) if body is not None else None

        async def once() -> B:
            resp = await client.request(method, target, body=data, headers=headers)
            _check(resp.status, resp.headers, resp.body, target)
            return agentapi.decode(resp.body, answer)

        end = time.monotonic() + GIVE_UP_S
        attempt = 0
        while True:
            self.sent[int(time.time() * 10)] += 1
            try:
                return await once()
            except (_Busy, OSError, TimeoutError) as exc:
                if backoff is None or time.monotonic() > end:
                    raise
                await asyncio.sleep(backoff.wait(attempt, _retry_after(exc)))
                attempt += 1

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.guard is not None
        try:
            tickle = self.guard.check(data)
        except wire.TickleRejected:
            return
        if tickle.kind is wire.Kind.TASKS:
            self.trace.tickles += 1
            if self.trace.tickled_at is None:
                self.trace.tickled_at = time.time()
            if self.pulling:
                self.again = True
                self.tickled.set()
            else:
                asyncio.get_running_loop().create_task(self.pull())

    async def pull_once(self) -> AgentTasks | None:
        """One pull, as the real agent's poller makes it: a failed one is tried again at the
        next tickle (the task server resends) or on the agent's retry poll (retries.PULL),
        whichever comes first; None when it kept failing for GIVE_UP_S."""
        end = time.monotonic() + GIVE_UP_S
        while True:
            self.tickled.clear()
            if self.trace.pull_sent_at is None:
                self.trace.pull_sent_at = time.time()
            try:
                tasks = await self.call(
                    "GET", "/api/agent/tasks?via=tickle", None, AgentTasks, self.auth, None
                )
            except (_Busy, OSError, TimeoutError) as exc:
                self.pull_failures += 1
                if time.monotonic() > end:
                    return None
                if self.again:  # a tickle came while it failed: pull again at once
                    self.again = False
                    continue
                delay = retries.PULL.wait(self.pull_failures - 1, _retry_after(exc))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.tickled.wait(), delay)
                self.again = False
                continue
            self.pull_failures = 0
            if self.trace.pulled_at is None:
                self.trace.pulled_at = time.time()
            return tasks

    async def hold_long_poll(self) -> None:
        """As the real agent's poller holds it: one long-poll at a time, armed again after a
        short random pause, and after a failure on retries.LONG_POLL (after Retry-After)."""
        assert self.http is not None
        headers = JSON_TYPE + self.auth
        # the task server answers by its bound: this only catches one that never does
        limit = self.long_poll_timeout_s + 15.0
        failures = 0
        while True:
            self.sent[int(time.time() * 10)] += 1
            try:
                resp = await self.http.request(
                    "GET", "/api/agent/tasks/wait", headers=headers, timeout_s=limit
                )
                if resp.status >= 500:
                    raise _Busy(_retry_after_header(resp.headers))
                _check(resp.status, resp.headers, resp.body, "/api/agent/tasks/wait")
                answer = None if resp.status == 204 else agentapi.decode(resp.body, AgentTasks)
            except (_Busy, ApiError, OSError, TimeoutError) as exc:
                await asyncio.sleep(retries.LONG_POLL.wait(failures, _retry_after(exc)))
                failures += 1
                continue
            failures = 0
            if answer is not None and answer.executions:
                await self.run(answer)
            await asyncio.sleep(random.uniform(*retries.LONG_POLL_REARM_S))

    async def run(self, tasks: AgentTasks) -> None:
        """Run the new executions of a pull (simulated): post their `started` and `finished`."""
        events = []
        for work in tasks.executions:
            if work.execution_id in self.seen:
                continue
            self.seen.add(work.execution_id)
            now = time.time()
            events += [
                StatusEvent(event_id=new_event_id(), execution_id=work.execution_id,
                            computer=self.name, kind="started", at=now),
                StatusEvent(event_id=new_event_id(), execution_id=work.execution_id,
                            computer=self.name, kind="finished", at=now,
                            status="succeeded", exit_code=0),
            ]  # fmt: skip
        if events:
            await self.call("POST", "/api/agent/events", EventBatch(events=events),
                            EventAck, self.auth, retries.EVENTS)  # fmt: skip

    async def pull(self) -> None:
        """Pull when tickled (a tickle during the pull: once more after it); the run posts its
        events apart, as the real agent's executions and outbox do: a tickle that comes while
        they are posted is pulled at once."""
        self.pulling = True
        try:
            while True:
                self.again = False
                tasks = await self.pull_once()
                if tasks is None:
                    raise RuntimeError(f"no pull answered in {GIVE_UP_S:.0f}s")
                self._running.add(run := asyncio.get_running_loop().create_task(self.run(tasks)))
                run.add_done_callback(self._ran)
                if not self.again:
                    return
        except Exception as exc:  # a simulated agent reports and carries on
            print(f"{self.name}: pull failed: {exc!r}", file=sys.stderr, flush=True)
        finally:
            self.pulling = False

    def _ran(self, run: asyncio.Task[None]) -> None:
        self._running.discard(run)
        if not run.cancelled() and run.exception() is not None:
            print(f"{self.name}: posting events failed: {run.exception()!r}", file=sys.stderr,
                  flush=True)  # fmt: skip


async def main(
    ts_url: str, net: str, indexes: list[int], tickle_port: int, long_poll: bool = False
) -> None:
    secret = os.environ[SECRET_ENV]
    # a few descriptors per agent (its tickle socket, its connection): a process of many agents
    # needs more than a default soft limit of 1,024
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sent: Counter[int] = Counter()
    agents = [SimAgent(sim_name(i), sim_host(net, i), ts_url, sent, tickle_port=tickle_port,
                       cem=long_poll) for i in indexes]  # fmt: skip
    sem = asyncio.Semaphore(20)

    async def start(a: SimAgent) -> None:
        async with sem:
            await a.start(secret)

    await asyncio.gather(*(start(a) for a in agents))
    settle_gc()  # the agents made at start stay: out of the collector's way
    print(f"ready {len(agents)}", flush=True)
    holding = [asyncio.create_task(a.hold_long_poll()) for a in agents if long_poll]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    for task in holding:
        task.cancel()
    await asyncio.gather(*holding, return_exceptions=True)
    for a in agents:
        await a.close()
    print("stats " + json.dumps(sent), flush=True)
    print("trace " + json.dumps([dataclasses.astuple(a.trace) for a in agents]), flush=True)


# the cyclic garbage collector's thresholds once started: the servers' (tickle.serving's, which
# this module does not import: fastapi and pydantic cost a simulator process 1.3 CPU-s to start)
GC_THRESHOLD = (50_000, 20, 10)


def settle_gc() -> None:
    """As `tickle.serving.settle_gc`: what start-up made is kept out of the collector's passes."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


if __name__ == "__main__":
    url, net, indexes, port = sys.argv[1:5]
    agents = [int(i) for i in indexes.split(",")]
    # the servers' event loop (uvloop): a simulated agent's requests cost the CPU the servers
    # it shares the machine with would use
    run = main(url, net, agents, int(port), "--long-poll" in sys.argv)
    try:
        try:
            import uvloop
        except ImportError:  # asyncio's own where uvloop is not installed, as tickle.serving
            asyncio.run(run)
        else:
            uvloop.run(run)
    except CannotStart as exc:
        print(f"failed {exc}", flush=True)  # what `SimAgents.start` reads instead of "ready"
        sys.exit(1)
