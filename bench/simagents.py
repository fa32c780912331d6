"""Many simulated client task agents in one process, for the 1,000-agent benchmark.

Each simulated agent is real on the wire: it registers with its task server over HTTP, binds its
own UDP tickle listener on its own loopback address (port 50124), verifies every tickle with
TickleGuard, pulls its tasks over HTTP when tickled, and posts `started` and `finished` status
events. Only the task itself is simulated (it "succeeds" at once, without spawning a process).

Usage: TICKLE_AGENT_ENROLLMENT_SECRET=... python bench/simagents.py TS_URL FIRST_INDEX COUNT NET_PREFIX
(the agents' enrollment secret in the environment, never on the command line)
Prints "ready N" when every agent is registered and listening; stops on SIGTERM.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
import time
import uuid

import aiohttp

from tickle import http, wire
from tickle.messages import (
    AgentEnrollment,
    AgentRegister,
    AgentTasks,
    EventAck,
    EventBatch,
    StatusEvent,
)

AGENT_PORT = 50124


class SimAgent(asyncio.DatagramProtocol):
    def __init__(self, name: str, host: str, ts_url: str) -> None:
        self.name = name
        self.host = host
        self.ts_url = ts_url
        self.session: aiohttp.ClientSession | None = None
        self.guard: wire.TickleGuard | None = None
        self.seen: set[int] = set()
        self.pulling = False
        self.again = False

    async def start(self, secret: str) -> None:
        connector = aiohttp.TCPConnector(local_addr=(self.host, 0), limit=4)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=30)
        )
        enrollment = await http.request(
            self.session, "POST", self.ts_url + "/api/agent/register",
            body=AgentRegister(enrollment_secret=secret, name=self.name, tickle_host=self.host,
                               tickle_port=AGENT_PORT, reported_address=self.host),
            answer=AgentEnrollment,
        )  # fmt: skip
        self.token = enrollment.token
        self.guard = wire.TickleGuard({enrollment.ts_name: base64.b64decode(enrollment.tickle_key)})
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self, local_addr=(self.host, AGENT_PORT))

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.guard is not None
        try:
            tickle = self.guard.check(data)
        except wire.TickleRejected:
            return
        if tickle.kind is wire.Kind.TASKS:
            if self.pulling:
                self.again = True
            else:
                asyncio.get_running_loop().create_task(self.pull())

    async def pull(self) -> None:
        assert self.session is not None
        self.pulling = True
        try:
            while True:
                self.again = False
                tasks = await http.request(
                    self.session, "GET", self.ts_url + "/api/agent/tasks",
                    params={"via": "tickle"}, answer=AgentTasks, token=self.token,
                )  # fmt: skip
                events = []
                for work in tasks.executions:
                    if work.execution_id in self.seen:
                        continue
                    self.seen.add(work.execution_id)
                    now = time.time()
                    for kind, extra in (
                        ("started", {}),
                        ("finished", {"status": "succeeded", "exit_code": 0}),
                    ):
                        events.append(
                            StatusEvent(
                                event_id=str(uuid.uuid4()),
                                execution_id=work.execution_id,
                                computer=self.name,
                                kind=kind,
                                at=now,
                                **extra,
                            )
                        )  # type: ignore[arg-type]
                if events:
                    await http.request(
                        self.session, "POST", self.ts_url + "/api/agent/events",
                        body=EventBatch(events=events), answer=EventAck, token=self.token,
                    )  # fmt: skip
                if not self.again:
                    return
        except Exception as exc:  # a benchmark agent reports and carries on
            print(f"{self.name}: pull failed: {exc}", file=sys.stderr, flush=True)
        finally:
            self.pulling = False


async def main(ts_url: str, secret: str, first: int, count: int, net: str) -> None:
    agents = []
    for i in range(first, first + count):
        host = f"{net}.{i // 250}.{i % 250 + 1}"
        agents.append(SimAgent(f"sim-{i:05d}", host, ts_url))
    sem = asyncio.Semaphore(20)

    async def start(a: SimAgent) -> None:
        async with sem:
            await a.start(secret)

    await asyncio.gather(*(start(a) for a in agents))
    print(f"ready {len(agents)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    for a in agents:
        if a.session is not None:
            await a.session.close()


if __name__ == "__main__":
    url, first, count, net = sys.argv[1:5]
    secret = os.environ["TICKLE_AGENT_ENROLLMENT_SECRET"]
    asyncio.run(main(url, secret, int(first), int(count), net))
