"""The cgroup path, against a fake cgroupfs (a directory tree): finding the delegated cgroup,
entering it, a step entering its own, and killing what is listed there.

The fake has no kernel behind it: a process does not join a cgroup by being forked there, so the
tests list the pids a step's processes would have there themselves. On a real host the Molecule
check (molecule/tests/test_contained_tasks.py) runs the same path under systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tickle.agent import cgroup
from tickle.agent.cgroup import Cgroups, delegated_cgroup
from tickle.agent.executor import Executor
from tickle.agent.state import AgentState
from tickle.messages import TaskSpec
from tickle.metrics import ComponentMetrics
from tickle.outbox import Outbox, OutboxForwarder

from .conftest import dies

UNIT = "system.slice/tickle-client-task-agent.service"
# the environment systemd gives the process it starts for a unit
UNIT_MAIN = {"INVOCATION_ID": "ab12", "SYSTEMD_EXEC_PID": str(os.getpid())}


@pytest.fixture
def cgroupfs(tmp_path: Path) -> Path:
    """A cgroup2 mount with the agent's unit cgroup in it."""
    root = tmp_path / "sys-fs-cgroup unified"
    (root / UNIT).mkdir(parents=True)
    (root / UNIT / "cgroup.procs").write_text("")
    return root


def proc_self(tmp_path: Path, cgroup_line: str, mount: Path, fstype: str = "cgroup2") -> Path:
    """/proc/self's cgroup and mountinfo, as on a hybrid host (cgroup2 at .../unified)."""
    d = tmp_path / "proc-self"
    d.mkdir(exist_ok=True)
    (d / "cgroup").write_text(f"12:pids:/{UNIT}\n1:name=systemd:/{UNIT}\n{cgroup_line}\n")
    escaped = str(mount).replace(" ", "\\040")
    (d / "mountinfo").write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        f"30 25 0:26 / {escaped} rw,nosuid,nodev,noexec,relatime shared:9 - {fstype} cgroup2 rw\n"
    )
    return d


def delegate(directory: Path) -> None:
    try:
        os.setxattr(directory, "user.delegate", b"1")
    except OSError as exc:
        pytest.skip(f"this file system takes no user xattrs: {exc}")


def test_the_delegated_cgroup_is_found_below_the_cgroup2_mount(
    tmp_path: Path, cgroupfs: Path
) -> None:
    delegate(cgroupfs / UNIT)
    d = proc_self(tmp_path, f"0::/{UNIT}", cgroupfs)
    assert delegated_cgroup(UNIT_MAIN, d) == (cgroupfs / UNIT, "delegated")


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no systemd", "not the process a systemd unit started"),
        ("another process of the unit", "not the process a systemd unit started"),
        ("cgroup v1 only", "no cgroup v2 hierarchy"),
        ("not mounted", "is not mounted here"),
        ("not delegated", "is not delegated to the agent (Delegate=yes)"),
    ],
)
def test_without_a_delegated_cgroup_v2_there_is_none_and_the_reason_says_why(
    tmp_path: Path, cgroupfs: Path, monkeypatch: pytest.MonkeyPatch, case: str, reason: str
) -> None:
    monkeypatch.setattr(cgroup.shutil, "which", lambda name: None)  # no systemctl to ask
    env = {
        "no systemd": {},
        "another process of the unit": {"SYSTEMD_EXEC_PID": str(os.getppid())},
    }.get(case, UNIT_MAIN)
    line = "" if case == "cgroup v1 only" else f"0::/{UNIT}"
    d = proc_self(tmp_path, line, cgroupfs, fstype="tmpfs" if case == "not mounted" else "cgroup2")
    directory, why = delegated_cgroup(env, d)
    assert directory is None
    assert reason in why


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait()


def test_the_agent_enters_its_leaf_and_kills_what_an_earlier_run_left(
    cgroupfs: Path, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    base = cgroupfs / UNIT
    (base / "agent").mkdir()
    (base / "agent" / "cgroup.procs").write_text("")
    stale = base / "task-7-0-abcdef"
    stale.mkdir()
    sleepers.append(subprocess.Popen(["sleep", "60"], start_new_session=True))
    (stale / "cgroup.procs").write_text(f"{sleepers[0].pid}\n")
    cgroups = Cgroups.enter(base)
    assert cgroups.kind == "cgroup"
    assert (base / "agent" / "cgroup.procs").read_text() == str(os.getpid())
    assert sleepers[0].wait(5) == -signal.SIGKILL


@pytest.fixture
def executor(tmp_path: Path, cgroupfs: Path) -> Iterator[tuple[Executor, Outbox]]:
    state = AgentState(tmp_path / "agent.db")
    outbox = Outbox(tmp_path / "outbox.db")
    metrics = ComponentMetrics("agent")
    unstarted = OutboxForwarder(outbox, _never_sent, metrics)
    yield Executor(
        "agent1", state, unstarted, metrics, containment=Cgroups(cgroupfs / UNIT),
        kill_grace_s=0.3,
    ), outbox  # fmt: skip
    outbox.close()
    state.close()


async def _never_sent(bodies: list[str]) -> list[str]:
    raise AssertionError("the forwarder is not started")


async def step_cgroup(base: Path) -> Path:
    for _ in range(500):
        if found := sorted(base.glob("task-*")):
            return found[0]
        await asyncio.sleep(0.01)
    raise AssertionError("the step's cgroup was never made")


async def pid_in(path: Path) -> int:
    for _ in range(500):
        with contextlib.suppress(FileNotFoundError, ValueError):
            return int(path.read_text())
        await asyncio.sleep(0.01)
    raise AssertionError(f"no pid in {path}")


async def test_a_step_enters_its_own_cgroup_and_what_is_listed_there_dies_with_it(
    executor: tuple[Executor, Outbox], cgroupfs: Path, tmp_path: Path
) -> None:
    ex, _ = executor
    child, gate = tmp_path / "child.pid", tmp_path / "gate"
    text = (
        f"echo main=$$; setsid sh -c 'echo $$ > {child}; exec sleep 60' &\n"
        f"while [ ! -e {gate} ]; do sleep 0.02; done; exit 0\n"
    )
    step = asyncio.create_task(ex.run_step(TaskSpec(name="s", script=text), 31, 0))
    where = await step_cgroup(cgroupfs / UNIT)
    pid = await pid_in(child)
    try:
        entered = (where / "cgroup.procs").read_text().split()
        with (where / "cgroup.procs").open("a") as procs:  # the kernel would have put it there
            procs.write(f"{pid}\n")
        gate.touch()
        outcome = await asyncio.wait_for(step, 10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert where.name.startswith("task-31-0-")
    assert outcome.status == "succeeded"
    assert entered == [outcome.output_tail.split("main=")[1].split()[0]]  # before it ran
    assert "[tickle] killed 1 process the task left running" in outcome.output_tail
    assert await dies(pid)


async def test_a_timed_out_step_is_killed_through_cgroup_kill(
    executor: tuple[Executor, Outbox], cgroupfs: Path, tmp_path: Path
) -> None:
    ex, _ = executor
    (cgroupfs / UNIT / "cgroup.kill").write_text("")  # Linux ≥ 5.14
    ex.containment = Cgroups(cgroupfs / UNIT)
    child = tmp_path / "child.pid"
    text = f"setsid sh -c 'trap \"\" TERM; echo $$ > {child}; exec sleep 60' &\nexec sleep 60\n"
    step = asyncio.create_task(ex.run_step(TaskSpec(name="s", script=text, timeout_s=0.5)))
    where = await step_cgroup(cgroupfs / UNIT)
    pid = await pid_in(child)
    try:
        with (where / "cgroup.procs").open("a") as procs:
            procs.write(f"{pid}\n")
        (where / "cgroup.kill").write_text("")
        outcome = await asyncio.wait_for(step, 10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert outcome.status == "timed_out"
    assert (where / "cgroup.kill").read_text() == "1"
    assert await dies(pid)  # it ignored SIGTERM: SIGKILL after the grace
    assert "timed out after 0.5 s: killed it and 1 process it started" in outcome.output_tail


def test_a_step_cgroup_is_removed_with_those_below_it_and_retried_while_busy(
    cgroupfs: Path,
) -> None:
    cgroups = Cgroups(cgroupfs / UNIT)
    empty = cgroupfs / UNIT / "task-1-0-aaaaaa"
    (empty / "nested" / "deeper").mkdir(parents=True)
    cgroups.remove(empty)
    assert not empty.exists()
    busy = cgroupfs / UNIT / "task-2-0-bbbbbb"
    busy.mkdir()
    (busy / "cgroup.procs").write_text("1\n")  # rmdir fails while it is not empty
    cgroups.remove(busy)
    assert busy.exists()
    (busy / "cgroup.procs").unlink()
    tree = cgroups.open("3-0")  # each new step retries what could not be removed
    assert not busy.exists()
    tree.release()
