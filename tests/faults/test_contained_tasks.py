"""A task's whole process tree is contained, whatever it does: new sessions, double forks, a
daemon that closes its descriptors and clears its environment, a child that ignores SIGTERM.

Each escape runs in a real `tickle agent` process (the subreaper path on this machine: no systemd)
against the fake task server. The execution must end within a bound with its status recorded,
and no process of its tree may survive: at its timeout, when its main process exits, when the
agent stops, and while another execution runs beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from tests.agent.agent_process import AgentProcess, agent_process, first_pull
from tests.agent.conftest import free_udp_port, script
from tests.agent.fake_ts import FakeTaskServer
from tests.reliability import record
from tickle.messages import StatusEvent

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(90)]

T = TypeVar("T")

SLEEP = shutil.which("sleep") or "/bin/sleep"
KILL_GRACE_S = 1.0  # the agent's task_kill_grace_s in these tests
TIMEOUT_S = 2.0
# after the main process exits, the rest of the tree may hold the output this long (executor)
DRAIN_S = 2.0
SLACK_S = 3.0  # scheduling on a loaded 2-core machine
PIDFILE = "escaped.pid"

# Each escape starts one process that writes its own pid to {pid} and then sleeps for an hour.
ESCAPES: dict[str, str] = {
    # a new session, still holding the output pipe (the issue's `setsid sleep 3600 &`)
    "setsid": "setsid sh -c 'echo $$ > {pid}; exec {sleep} 3600' &",
    # orphaned at once (its parent exits), output redirected: nothing left to wait for
    "double-fork": "( sh -c 'echo $$ > {pid}; exec {sleep} 3600' > /dev/null 2>&1 & )",
    # double fork, new session, every descriptor closed, an empty environment, cwd /
    "daemon": (
        "( setsid env -i /bin/sh -c 'cd /; exec 0<&- 1>&- 2>&-; echo $$ > {pid};"
        " exec {sleep} 3600' & )"
    ),
    # a new session, holding the pipe, and deaf to SIGTERM: only SIGKILL ends it
    "ignores-SIGTERM": "setsid sh -c 'trap \"\" TERM; echo $$ > {pid}; exec {sleep} 3600' &",
}


def escape(name: str, pidfile: Path) -> str:
    return ESCAPES[name].format(pid=pidfile, sleep=SLEEP)


def shown(name: str) -> str:
    """The escape as RELIABILITY.md shows it."""
    return ESCAPES[name].format(pid="FILE", sleep="sleep")


def read_pid(path: Path) -> int | None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        return int(path.read_text().strip())
    return None


def exists(pid: int) -> bool:
    """Still in the process table: alive, or a zombie nobody reaped."""
    return os.path.exists(f"/proc/{pid}")


async def within(condition: Callable[[], T | None], seconds: float) -> T | None:
    """`condition()` once it is truthy, or None after `seconds` (bounded, never raises)."""
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value or time.monotonic() > deadline:
            return value or None
        await asyncio.sleep(0.02)


async def survivors(pids: list[int], seconds: float = 3.0) -> list[int]:
    """The pids still in the process table after a bounded wait."""
    await within(lambda: not any(exists(p) for p in pids), seconds)
    return [p for p in pids if exists(p)]


def kill_quietly(pids: list[int | None]) -> None:
    """Test cleanup: nothing a failed run left behind outlives the test."""
    for pid in pids:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def contained_agent(
    fake: FakeTaskServer, root: Path, sock_dir: Path
) -> AsyncIterator[AgentProcess]:
    async with agent_process(
        fake, root / "state", sock_dir, "--tickle-port", str(free_udp_port()),
        TICKLE_AGENT_TASK_KILL_GRACE_S=str(KILL_GRACE_S),
    ) as agent:  # fmt: skip
        await first_pull(fake, agent)
        yield agent


async def containment_path(agent: AgentProcess) -> str:
    status = await agent.control("GET", "/status")
    return str(status.get("containment", "-"))


async def finished_event(
    fake: FakeTaskServer, execution_id: int, seconds: float
) -> StatusEvent | None:
    events = await within(lambda: fake.events_of(execution_id, "finished"), seconds)
    return events[0] if events else None


@dataclass
class Escaped:
    """How an execution with one escaping process ended, in a real agent process."""

    finished: StatusEvent | None
    took: float  # check-now to the finished event, seconds
    survivors: list[int]
    path: str  # the agent's containment

    def record(self, case: str, done: str, status: str, bound: float) -> None:
        """Its row in RELIABILITY.md, then the checks every such case makes."""
        got = self.finished.status if self.finished else "none (hangs)"
        record(
            case=case, done=done, tried=1,
            outcome="pass" if got == status and not self.survivors else "fail",
            status=got, ended_after_s=self.took, survivors=len(self.survivors), path=self.path,
        )  # fmt: skip
        assert self.finished is not None, f"the execution never finished (bound {bound:.1f} s)"
        assert self.finished.status == status, self.finished
        assert self.took <= bound, f"ended after {self.took} s, bound {bound:.1f} s"
        assert not self.survivors, f"pid {self.survivors} outlived its execution"


async def run_escape(
    fake: FakeTaskServer, root: Path, sock_dir: Path, text: str, timeout_s: float, bound: float
) -> Escaped:
    """Run `text` as execution 61: it starts a process that writes its pid to `PIDFILE`."""
    pidfile = root / PIDFILE
    escaped = None
    try:
        async with contained_agent(fake, root, sock_dir) as agent:
            fake.work[61] = script(61, text, timeout_s=timeout_s)
            began = time.monotonic()
            await agent.control("POST", "/check-now")
            escaped = await within(lambda: read_pid(pidfile), 10.0)
            assert escaped is not None, "the escaping process never started"
            finished = await finished_event(fake, 61, bound + 5.0)
            took = round(time.monotonic() - began, 2)
            left = await survivors([escaped])
            path = await containment_path(agent)
            assert await agent.stop() == 0
    finally:
        kill_quietly([escaped])
    return Escaped(finished, took, left, path)


@pytest.mark.parametrize("name", list(ESCAPES))
async def test_escaped_process_is_killed_at_the_timeout(
    name: str, fake_ts: FakeTaskServer, tmp_path: Path, short_dir: Path
) -> None:
    text = f"{escape(name, tmp_path / PIDFILE)}\necho started\nexec {SLEEP} 3600\n"
    bound = TIMEOUT_S + KILL_GRACE_S + SLACK_S
    ended = await run_escape(fake_ts, tmp_path, short_dir, text, TIMEOUT_S, bound)
    ended.record(
        f"task escapes its timeout: {name}",
        f"`{shown(name)}` then sleep 3600, timeout {TIMEOUT_S:g} s,"
        f" kill grace {KILL_GRACE_S:g} s, real agent process",
        "timed_out", bound,
    )  # fmt: skip
    assert ended.finished is not None
    assert "started" in (ended.finished.output_tail or "")
    assert "killed" in (ended.finished.output_tail or ""), ended.finished.output_tail


@pytest.mark.parametrize("name", list(ESCAPES))
async def test_leftover_process_is_killed_when_the_task_exits(
    name: str, fake_ts: FakeTaskServer, tmp_path: Path, short_dir: Path
) -> None:
    # the main process succeeds at once and leaves its escaped child behind
    pidfile = tmp_path / PIDFILE
    text = f"{escape(name, pidfile)}\nwhile [ ! -s {pidfile} ]; do :; done\necho done\nexit 0\n"
    bound = DRAIN_S + KILL_GRACE_S + SLACK_S
    ended = await run_escape(fake_ts, tmp_path, short_dir, text, 60.0, bound)
    ended.record(
        f"task exits leaving a process behind: {name}",
        f"`{shown(name)}` then exit 0 (timeout 60 s),"
        f" kill grace {KILL_GRACE_S:g} s, real agent process",
        "succeeded", bound,
    )  # fmt: skip
    assert ended.finished is not None
    assert ended.finished.exit_code == 0
    assert "done" in (ended.finished.output_tail or "")
    assert "killed 1 process" in (ended.finished.output_tail or ""), ended.finished.output_tail


async def test_agent_stop_kills_every_escaped_process_and_reports_the_execution(
    fake_ts: FakeTaskServer, tmp_path: Path, short_dir: Path
) -> None:
    pidfiles = {name: tmp_path / f"{i}.pid" for i, name in enumerate(ESCAPES)}
    text = "\n".join(escape(name, pidfiles[name]) for name in ESCAPES) + f"\nexec {SLEEP} 3600\n"
    escaped: list[int] = []
    try:
        async with contained_agent(fake_ts, tmp_path, short_dir) as agent:
            fake_ts.work[63] = script(63, text, timeout_s=600)
            await agent.control("POST", "/check-now")
            started = await within(lambda: all(read_pid(p) for p in pidfiles.values()), 10.0)
            assert started, "the escaping processes never started"
            escaped = [pid for p in pidfiles.values() if (pid := read_pid(p))]
            path = await containment_path(agent)
            began = time.monotonic()
            code = await agent.stop(signal.SIGTERM)
            took = round(time.monotonic() - began, 2)
        left = await survivors(escaped)
    finally:
        kill_quietly(list(escaped))
    finished = fake_ts.events_of(63, "finished")
    status = finished[0].status if finished else "none"
    record(
        case="agent stopped while a task's escaped processes run",
        done="one task starts all four escapes (setsid, double fork, daemon, ignores SIGTERM)"
        f" and sleeps; SIGTERM the agent (stop grace 0 s, kill grace {KILL_GRACE_S:g} s)",
        outcome="pass" if code == 0 and not left and status == "interrupted" else "fail",
        tried=1,
        status=status,
        agent_exit=code,
        stopped_after_s=took,
        survivors=len(left),
        path=path,
    )
    assert code == 0, agent.log.read_text()
    assert took <= KILL_GRACE_S + SLACK_S + 1.0, f"the agent took {took} s to stop"
    assert not left, f"pids {left} survived the agent's stop"
    assert status == "interrupted", "the stopped execution was not reported at the stop"


async def test_leftovers_die_with_their_own_execution_not_with_a_neighbour(
    fake_ts: FakeTaskServer, tmp_path: Path, short_dir: Path
) -> None:
    """A ends while B runs: A's leftover dies with A, B's escaped process lives until B ends.

    A's leftover lives as its descendant for a while (the agent learns it is A's) before A exits;
    B's daemon is orphaned at once, with no session, descriptor or environment of B's: the agent
    cannot tell whose it is, so it is killed only once no execution that might own it runs.
    """
    a_pid, b_pid = tmp_path / "a.pid", tmp_path / "b.pid"
    a_text = (
        f"setsid env -i /bin/sh -c 'exec 0<&- 1>&- 2>&-; echo $$ > {a_pid}; exec {SLEEP} 3600' &\n"
        f"{SLEEP} 2.5\nexit 0\n"
    )
    b_text = f"{escape('daemon', b_pid)}\nexec {SLEEP} 3600\n"
    b_timeout = 8.0
    pids: list[int | None] = []
    try:
        async with contained_agent(fake_ts, tmp_path, short_dir) as agent:
            fake_ts.work[64] = script(64, b_text, timeout_s=b_timeout)
            fake_ts.work[65] = script(65, a_text, timeout_s=60)
            began = time.monotonic()
            await agent.control("POST", "/check-now")
            started = await within(lambda: read_pid(a_pid) and read_pid(b_pid), 10.0)
            pids = [read_pid(a_pid), read_pid(b_pid)]
            assert started, "the escaping processes never started"
            a_done = await finished_event(fake_ts, 65, 2.5 + DRAIN_S + KILL_GRACE_S + SLACK_S)
            assert a_done is not None, "A never finished"
            a_left = await survivors([pids[0] or 0], KILL_GRACE_S + 1.0)
            b_running = not fake_ts.events_of(64, "finished")
            b_alive_after_a = pids[1] is not None and exists(pids[1])
            b_done = await finished_event(fake_ts, 64, b_timeout + KILL_GRACE_S + SLACK_S)
            took = round(time.monotonic() - began, 2)
            b_left = await survivors([pids[1] or 0])
            path = await containment_path(agent)
            assert await agent.stop() == 0
    finally:
        kill_quietly(pids)
    record(
        case="two executions at once: leftovers die with their own execution",
        done="A leaves an env-cleared, fd-less new-session child and exits after 2.5 s; B starts"
        f" a daemon at once and times out after {b_timeout:g} s",
        outcome="pass"
        if a_done.status == "succeeded"
        and not a_left
        and b_alive_after_a
        and b_done
        and b_done.status == "timed_out"
        and not b_left
        else "fail",
        tried=1,
        a_status=a_done.status,
        b_status=b_done.status if b_done else "none",
        b_ended_after_s=took,
        path=path,
    )
    assert a_done.status == "succeeded", a_done
    assert not a_left, "A's leftover outlived A"
    assert b_running, "B ended before A's leftover was checked"
    assert b_alive_after_a, "B's process was killed when A ended"
    assert b_done is not None, "B never finished"
    assert b_done.status == "timed_out", b_done
    assert not b_left, "B's daemon outlived B"
