"""The task server as a real process, and against the real notification server process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.taskserver.conftest import (
    AGENT_SECRET,
    SECRET,
    FakeNs,
    TaskServerHarness,
    wait_until,
    work_for,
)
from tickle import wire
from tickle.http import request
from tickle.messages import AgentEnrollment, AgentRegister, StatusEvent

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

RUN_MAIN = "import sys; from {module} import main; sys.exit(main(sys.argv[1:]))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A component process with its log in a file; stopped by SIGTERM at the end."""

    def __init__(
        self, module: str, args: list[str], log: Path, secrets: dict[str, str] | None = None
    ) -> None:
        self.log = log
        self._log_file = log.open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TICKLE_")}
        # secrets go in the environment, never on argv (readable by all in /proc/PID/cmdline)
        env |= {
            "TICKLE_TS_ENROLLMENT_SECRET": SECRET,
            "TICKLE_TS_AGENT_ENROLLMENT_SECRET": AGENT_SECRET,
            **(secrets or {}),
        }
        self.popen = subprocess.Popen(
            [sys.executable, "-c", RUN_MAIN.format(module=module), *args],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(timeout=5)
        finally:
            self._log_file.close()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


async def wait_healthy(url: str, proc: Proc, within_s: float = 20.0) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while True:
            assert proc.popen.poll() is None, f"process exited:\n{proc.tail()}"
            try:
                async with http.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"{url} not healthy:\n{proc.tail()}"
            await asyncio.sleep(0.05)


def ts_args(ns_url: str, state_dir: Path, api_port: int, tickle_port: int) -> list[str]:
    return [
        "--name", "ts1", "--ns-url", ns_url,
        "--api-host", "127.0.0.1", "--api-port", str(api_port),
        "--tickle-host", "127.0.0.1", "--tickle-port", str(tickle_port),
        "--state-dir", str(state_dir), "--ns-wait-s", "20",
    ]  # fmt: skip


async def test_task_server_process_stops_cleanly_on_sigterm(
    fake_ns: FakeNs, tmp_path: Path, procs: list[Proc]
) -> None:
    port = free_port()
    ts = Proc(
        "tickle.taskserver.service",
        ts_args(fake_ns.url, tmp_path / "ts", port, free_port()),
        tmp_path / "ts.log",
    )
    procs.append(ts)
    await wait_healthy(f"http://127.0.0.1:{port}", ts)
    assert await asyncio.to_thread(ts.stop) == 0, ts.tail()
    assert fake_ns.count("register") == 1


async def test_events_cached_by_a_killed_task_server_process_reach_the_ns_after_restart(
    fake_ns: FakeNs, tmp_path: Path, procs: list[Proc]
) -> None:
    api_port, tickle_port = free_port(), free_port()
    url = f"http://127.0.0.1:{api_port}"
    args = ts_args(fake_ns.url, tmp_path / "ts", api_port, tickle_port)
    ts = Proc("tickle.taskserver.service", args, tmp_path / "ts1.log")
    procs.append(ts)
    await wait_healthy(url, ts)
    fake_ns.work = [work_for(1, "pc1")]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        enrollment: AgentEnrollment = await request(
            http, "POST", url + "/api/agent/register", answer=AgentEnrollment,
            body=AgentRegister(enrollment_secret=AGENT_SECRET, name="pc1", cem=True),
        )  # fmt: skip
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(fake_ns.tickle(), ("127.0.0.1", tickle_port))
        await wait_until(lambda: fake_ns.count("work") >= 2, what="the tickled work pull")

        await fake_ns.stop()
        events = [
            StatusEvent(
                event_id=str(uuid.uuid4()), execution_id=1, computer="pc1", kind=kind,
                at=time.time(), status="succeeded" if kind == "finished" else None,
            )
            for kind in ("started", "finished")
        ]  # fmt: skip
        headers = {"Authorization": f"Bearer {enrollment.token}"}
        body = {"events": [e.model_dump(mode="json") for e in events]}
        async with http.post(url + "/api/agent/events", json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
    ts.stop(signal.SIGKILL)  # no clean shutdown: only what was committed survives

    await fake_ns.start()
    ts2 = Proc("tickle.taskserver.service", args, tmp_path / "ts2.log")
    procs.append(ts2)
    await wait_until(
        lambda: {e.event_id for e in events} <= set(fake_ns.events),
        within_s=20,
        what=f"the events from the restarted task server\n{ts2.tail()}",
    )
    assert fake_ns.count("register") == 1


@pytest.fixture
async def real_ns(tmp_path: Path, procs: list[Proc]) -> tuple[str, str]:
    """The real notification server process: (its URL, the admin token)."""
    port = free_port()
    admin = "admin-" + uuid.uuid4().hex
    ns = Proc(
        "tickle.ns.service",
        [
            "--api-host", "127.0.0.1", "--api-port", str(port), "--state-dir",
            str(tmp_path / "ns"),
        ],
        tmp_path / "ns.log",
        {"TICKLE_NS_ADMIN_TOKEN": admin, "TICKLE_NS_ENROLLMENT_SECRET": SECRET},
    )  # fmt: skip
    procs.append(ns)
    url = f"http://127.0.0.1:{port}"
    await wait_healthy(url, ns)
    return url, admin  # the `procs` fixture stops it


async def test_run_now_at_the_real_ns_reaches_the_agent_and_its_result_is_recorded(
    real_ns: tuple[str, str], tmp_path: Path
) -> None:
    ns_url, admin = real_ns
    fake = FakeNs()  # only for the harness's bookkeeping; the real NS serves the TS
    h = TaskServerHarness(fake, tmp_path / "ts", ns_url=ns_url)
    try:
        await h.start()
        agent = await h.register_agent("pc1")
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10),
            headers={"Authorization": f"Bearer {admin}"},
        ) as op:
            task = await _json(op, "POST", f"{ns_url}/api/tasks",
                               {"name": "hello", "command": ["true"]})  # fmt: skip
            run = await _json(op, "POST", f"{ns_url}/api/runs",
                              {"task_id": task["id"], "computers": ["pc1"]})  # fmt: skip
            execution_id = run["executions"][0]["id"]

            # NS tickle -> TS pull -> the agent's tickle, verified with the agent's key
            await wait_until(lambda: agent.socket.datagrams, within_s=10, what="agent tickle")
            assert agent.tickles("ts1")[0].kind is wire.Kind.TASKS
            status, body = await h.call(agent, "GET", "/api/agent/tasks", params={"via": "tickle"})
            assert status == 200
            assert [e["execution_id"] for e in body["executions"]] == [execution_id]

            events = [
                StatusEvent(
                    event_id=str(uuid.uuid4()), execution_id=execution_id, computer="pc1",
                    kind=kind, at=time.time(), exit_code=0 if kind == "finished" else None,
                    status="succeeded" if kind == "finished" else None,
                )
                for kind in ("started", "finished")
            ]  # fmt: skip
            status, _ = await h.call(
                agent, "POST", "/api/agent/events",
                json={"events": [e.model_dump(mode="json") for e in events]},
            )  # fmt: skip
            assert status == 200

            async def recorded() -> dict[str, Any] | None:
                out = await _json(op, "GET", f"{ns_url}/api/executions/{execution_id}")
                return out if out["status"] == "succeeded" else None

            out = await _eventually(recorded, 10, "the finished execution at the NS")
            # all nine steps have a time: the TS reported agent_tickled and agent_pulled
            times = {step["step"]: step["at"] for step in out["timeline"]}
            assert None not in times.values(), out["timeline"]
            assert out["via"] == "tickle"
    finally:
        await h.close()


async def _json(http: aiohttp.ClientSession, method: str, url: str, body: Any = None) -> Any:
    async with http.request(method, url, json=body) as resp:
        assert resp.status < 400, f"{method} {url}: {resp.status} {await resp.text()}"
        return await resp.json()


async def _eventually(probe: Any, within_s: float, what: str) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = await probe()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_task_server_process_exits_1_naming_a_port_already_in_use(
    fake_ns: FakeNs, tmp_path: Path, procs: list[Proc]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ts = Proc(
            "tickle.taskserver.service",
            ts_args(fake_ns.url, tmp_path / "ts", port, free_port()),
            tmp_path / "ts.log",
        )
        procs.append(ts)
        code = await asyncio.to_thread(ts.popen.wait, 20)
    assert code == 1
    assert "cannot start" in ts.tail()
    assert "in use" in ts.tail()
