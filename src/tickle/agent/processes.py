"""The host's processes as /proc shows them, and killing a set of them for good.

A process is named by its pid and its start time together, so a pid the kernel has handed to
another process since is never signalled by mistake (signals go through a pidfd opened, then
checked, before sending). `terminate` is the one kill sequence every containment path uses:
SIGTERM, a grace period, SIGKILL, until nothing is left — bounded in time, whatever the processes
do meanwhile (fork, ignore SIGTERM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PROC = Path("/proc")
# how often a kill checks whether the processes are gone yet
_POLL_S = 0.05
# how long processes may take to disappear after SIGKILL (a process in uninterruptible sleep
# dies when its I/O ends); past it the kill gives up and says so
_KILL_WAIT_S = 5.0

Key = tuple[int, int]  # (pid, start time): one process, for ever


@dataclass(frozen=True, slots=True)
class Proc:
    """One process: the fields of /proc/PID/stat containment needs."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    start: int  # clock ticks after boot

    @property
    def key(self) -> Key:
        return (self.pid, self.start)

    @property
    def alive(self) -> bool:
        """Running or sleeping: neither a zombie waiting to be reaped nor dead."""
        return self.state not in ("Z", "X", "x")


def stat(pid: int, proc: Path = PROC) -> Proc | None:
    """The process `pid` is now, or None when there is none."""
    try:
        data = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = data[data.rindex(b")") + 2 :].split()
    return Proc(
        pid=pid, ppid=int(fields[1]), pgid=int(fields[2]), sid=int(fields[3]),
        state=fields[0].decode(), start=int(fields[19]),
    )  # fmt: skip


def subtree(root: int, proc: Path = PROC) -> dict[int, Proc]:
    """Every descendant of `root` (root excluded), zombies included, by pid.

    Reads the kernel's children lists (CONFIG_PROC_CHILDREN, on in distribution kernels), which
    costs as much as the subtree is large; without them, scans the whole process table.
    """
    if (proc / str(root) / "task" / str(root) / "children").exists():
        return _walk_children(root, proc)
    return _walk_table(root, proc)


def environ_has(pid: int, assignment: bytes, proc: Path = PROC) -> bool:
    """Whether process `pid` started with `assignment` ("NAME=value") in its environment."""
    try:
        return assignment in (proc / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


def send(p: Proc, sig: int) -> bool:
    """Signal `p` unless it is gone (or its pid now names another process); True when sent."""
    try:
        fd: int | None = os.pidfd_open(p.pid)
    except ProcessLookupError:
        return False
    except OSError:  # no pidfd (Linux < 5.3): check, then signal by pid
        fd = None
    try:
        now = stat(p.pid)
        if now is None or now.start != p.start:
            return False
        if fd is None:
            os.kill(p.pid, sig)
        else:
            signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # e.g. a setuid program under a non-root agent: `terminate` reports it
        return False
    finally:
        if fd is not None:
            os.close(fd)


async def terminate(
    members: Callable[[], Collection[Proc]],
    grace_s: float,
    kill_all: Callable[[], None] | None = None,
) -> set[Key]:
    """SIGTERM every live member, SIGKILL those left after `grace_s`; return whom it signalled.

    `members()` is asked again every few milliseconds until it is empty, so processes forked
    meanwhile are caught too (a subreaper reaps its zombies when asked). `kill_all` is a
    stronger SIGKILL where the containment has one (cgroup.kill).
    """
    signalled: set[Key] = set()
    deadline = time.monotonic() + grace_s
    while now := members():
        for p in now:
            if p.key not in signalled and send(p, signal.SIGTERM):
                signalled.add(p.key)
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(_POLL_S)
    deadline = time.monotonic() + _KILL_WAIT_S
    while now := members():
        if kill_all is not None:
            kill_all()
        for p in now:
            if send(p, signal.SIGKILL):
                signalled.add(p.key)
        if time.monotonic() >= deadline:
            log.error("%d processes survive SIGKILL: %s", len(now), sorted(p.pid for p in now))
            break
        await asyncio.sleep(_POLL_S)
    return signalled


def _walk_children(root: int, proc: Path) -> dict[int, Proc]:
    found: dict[int, Proc] = {}
    todo = [root]
    while todo:
        for child in _children(todo.pop(), proc):
            if child not in found and (p := stat(child, proc)) is not None:
                found[child] = p
                todo.append(child)
    return found


def _children(pid: int, proc: Path) -> list[int]:
    # children hang off the thread that forked them (or adopted them): read every thread's list
    tasks = proc / str(pid) / "task"
    try:
        tids = os.listdir(tasks)
    except OSError:
        return []
    pids: list[int] = []
    for tid in tids:
        with contextlib.suppress(OSError, ValueError):
            pids.extend(int(c) for c in (tasks / tid / "children").read_text().split())
    return pids


def _walk_table(root: int, proc: Path) -> dict[int, Proc]:
    children: defaultdict[int, list[Proc]] = defaultdict(list)
    for name in os.listdir(proc):
        if name.isdigit() and (p := stat(int(name), proc)) is not None:
            children[p.ppid].append(p)
    found: dict[int, Proc] = {}
    todo = [root]
    while todo:
        for p in children.get(todo.pop(), []):
            if p.pid not in found:
                found[p.pid] = p
                todo.append(p.pid)
    return found
