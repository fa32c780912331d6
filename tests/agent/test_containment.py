"""Task containment's pieces: reading /proc, signals that never hit a recycled pid, the kill
sequence, and which path `tickle agent` picks (the escapes themselves: tests/faults)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tickle.agent import processes
from tickle.agent.processes import Proc


def fake_stat(proc: Path, pid: int, ppid: int, comm: str = "sh", start: int = 1000) -> None:
    """/proc/PID/stat as the kernel writes it (52 fields; starttime is the 22nd)."""
    rest = ["S", str(ppid), str(pid), str(pid)] + ["0"] * 15 + [str(start)] + ["0"] * 30
    (proc / str(pid) / "task" / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "stat").write_text(f"{pid} ({comm}) {' '.join(rest)}\n")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def test_stat_reads_a_command_name_with_spaces_and_parentheses(tmp_path: Path) -> None:
    fake_stat(tmp_path, 42, 7, comm="a) (b c", start=12345)
    assert processes.stat(42, tmp_path) == Proc(42, 7, 42, 42, "S", 12345)
    assert processes.stat(43, tmp_path) is None


@pytest.mark.parametrize("children_lists", [True, False], ids=["children lists", "table scan"])
def test_subtree_is_every_descendant_and_nothing_else(tmp_path: Path, children_lists: bool) -> None:
    tree = {10: 1, 11: 10, 12: 10, 13: 11, 20: 1, 21: 20}  # pid: parent
    for pid, ppid in tree.items():
        fake_stat(tmp_path, pid, ppid)
    if children_lists:
        for pid in tree:
            kids = [str(c) for c, p in tree.items() if p == pid]
            (tmp_path / str(pid) / "task" / str(pid) / "children").write_text(" ".join(kids))
    assert sorted(processes.subtree(10, tmp_path)) == [11, 12, 13]


def test_environ_has_one_exact_assignment(tmp_path: Path) -> None:
    (tmp_path / "5").mkdir()
    (tmp_path / "5" / "environ").write_bytes(b"PATH=/bin\0TICKLE_EXECUTION_ID=12\0")
    assert processes.environ_has(5, b"TICKLE_EXECUTION_ID=12", tmp_path)
    assert not processes.environ_has(5, b"TICKLE_EXECUTION_ID=1", tmp_path)
    assert not processes.environ_has(6, b"TICKLE_EXECUTION_ID=12", tmp_path)


def test_a_signal_never_reaches_a_process_that_took_over_the_pid(
    sleeper: subprocess.Popen[bytes],
) -> None:
    now = processes.stat(sleeper.pid)
    assert now is not None
    earlier = Proc(now.pid, now.ppid, now.pgid, now.sid, now.state, now.start - 1)
    assert processes.send(earlier, signal.SIGKILL) is False
    assert sleeper.poll() is None
    assert processes.send(now, signal.SIGKILL) is True
    assert sleeper.wait(5) == -signal.SIGKILL


async def test_terminate_sends_sigterm_then_sigkill_after_the_grace() -> None:
    deaf = await asyncio.create_subprocess_exec(
        "sh", "-c", "trap '' TERM; echo ready; exec sleep 60",
        stdout=asyncio.subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        assert deaf.stdout is not None
        assert await deaf.stdout.readline() == b"ready\n"
        me = processes.stat(deaf.pid)
        assert me is not None

        def members() -> list[Proc]:
            p = processes.stat(deaf.pid)
            return [p] if p is not None and p.alive else []

        began = time.monotonic()
        signalled = await processes.terminate(members, grace_s=0.5)
        took = time.monotonic() - began
    finally:
        if deaf.returncode is None:
            deaf.kill()
        await deaf.wait()
    assert signalled == {me.key}
    assert deaf.returncode == -signal.SIGKILL  # SIGTERM was ignored; SIGKILL came after
    assert 0.5 <= took < 5.0


DETECT = """
import logging, os, sys
if sys.argv[1:] == ["unit"]:  # what systemd gives the process it starts for a unit
    os.environ.update(INVOCATION_ID="0123abcd", SYSTEMD_EXEC_PID=str(os.getpid()))
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
from tickle.agent.containment import detect
print("kind", detect().kind)
"""


@pytest.mark.parametrize(
    ("started_as", "reason"),
    [("process", "not the process a systemd unit started"), ("unit", "")],
    ids=["not under systemd", "under systemd, no delegated cgroup"],
)
def test_without_a_delegated_cgroup_the_agent_becomes_the_subreaper_and_says_why(
    started_as: str, reason: str
) -> None:
    # in a child process: detect() changes the process that calls it
    env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "SYSTEMD_EXEC_PID")}
    done = subprocess.run(
        [sys.executable, "-c", DETECT, started_as],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "kind subreaper", done.stdout
    said = done.stdout.splitlines()[0]
    assert said.startswith("tasks contained: the agent is their subreaper (no cgroup: "), said
    assert reason in said
