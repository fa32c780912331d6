"""The cgroup path of task containment: every step runs in a cgroup of its own.

Under systemd with `Delegate=yes` (the role's unit) the agent's cgroup (v2) is its own to divide.
At start the agent moves itself into the leaf `agent/` and clears what an earlier run left; each
step runs in `task-<label>-<nonce>/`, entered by the step's first process before it becomes the
task, so nothing the task does happens outside. No fork, double fork or new session leaves a
cgroup: the step's processes are exactly the cgroup's. They are killed as one (SIGTERM to each,
then cgroup.kill on Linux ≥ 5.14, else SIGKILL to each until none is left) and the cgroup removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from tickle.agent import processes
from tickle.agent.processes import Proc

log = logging.getLogger(__name__)

AGENT_LEAF = "agent"
STEP_PREFIX = "task-"
# the step's first process: move into the step's cgroup ($0), then become the task ("$@")
ENTER = 'echo $$ > "$0" || exit 125; exec "$@"'
SELF = Path("/proc/self")


def delegated_cgroup(
    environ: Mapping[str, str] = os.environ, proc_self: Path = SELF
) -> tuple[Path | None, str]:
    """This process's cgroup v2 directory when systemd delegated it (and it is writable).

    Only the process systemd started for the unit takes it (`SYSTEMD_EXEC_PID`, systemd ≥ 248):
    not an agent that something else in the unit started (a test fleet, a task). None
    otherwise, with the reason, for the log line of the fallback.
    """
    if environ.get("SYSTEMD_EXEC_PID") != str(os.getpid()):
        return None, "not the process a systemd unit started"
    own = _own_cgroup(proc_self / "cgroup")
    if own is None:
        return None, "no cgroup v2 hierarchy"
    directory = _cgroup2_directory(proc_self / "mountinfo", own)
    if directory is None or not (directory / "cgroup.procs").exists():
        return None, f"cgroup {own} is not mounted here"
    if not _delegated(directory):
        return None, f"{directory} is not delegated to the agent (Delegate=yes)"
    if not (os.access(directory, os.W_OK) and os.access(directory / "cgroup.procs", os.W_OK)):
        return None, f"{directory} is read-only to the agent (ProtectControlGroups=yes?)"
    return directory, "delegated"


class Cgroups:
    """Contains each step in a cgroup below the agent's delegated one."""

    kind = "cgroup"

    def __init__(self, base: Path) -> None:
        self.base = base
        self._cgroup_kill = (base / "cgroup.kill").exists()  # Linux ≥ 5.14
        self._unremoved: set[Path] = set()

    @classmethod
    def enter(cls, base: Path) -> Cgroups:
        """Move this process into `base`/agent, kill and remove the step cgroups left there."""
        leaf = base / AGENT_LEAF
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", str(os.getpid()))
        cgroups = cls(base)
        for stale in sorted(base.glob(f"{STEP_PREFIX}*")):
            log.warning("killing what an earlier run left in %s", stale)
            cgroups._kill_now(stale)
        return cgroups

    def open(self, label: str, marker: str | None = None) -> CgroupTree:
        """A new cgroup for one step (`marker` is the subreaper path's; a cgroup needs none)."""
        self._remove_unremoved()
        path = self.base / f"{STEP_PREFIX}{label}-{secrets.token_hex(3)}"
        path.mkdir()
        return CgroupTree(self, path)

    async def close(self, grace_s: float) -> None:
        """The agent stops: kill and remove whatever step cgroup is left."""
        for path in sorted(self.base.glob(f"{STEP_PREFIX}*")):
            tree = CgroupTree(self, path)
            if killed := await tree.kill(grace_s):
                log.warning("killed %d processes left in %s at the agent's stop", killed, path)
            tree.release()

    def kill_all(self, path: Path) -> None:
        if self._cgroup_kill:
            with contextlib.suppress(OSError):
                _write(path / "cgroup.kill", "1")

    def remove(self, path: Path) -> None:
        """Remove a step's cgroup (and any below it); retried later while something holds it."""
        for directory in sorted((d for d, _, _ in os.walk(path)), key=len, reverse=True):
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.debug("cgroup %s not removed yet: %s", directory, exc)
                self._unremoved.add(path)
                return
        self._unremoved.discard(path)

    def _remove_unremoved(self) -> None:
        for path in list(self._unremoved):
            self.remove(path)

    def _kill_now(self, path: Path) -> None:
        """At start, before anything runs: SIGKILL what a cgroup holds, wait (bounded), remove."""
        deadline = time.monotonic() + 2.0
        while (left := _pids(path)) and time.monotonic() < deadline:
            self.kill_all(path)
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self.remove(path)


class CgroupTree:
    """The processes of one step: its cgroup's, and its main process until it has entered."""

    def __init__(self, owner: Cgroups, path: Path) -> None:
        self.owner = owner
        self.path = path
        self.main: Proc | None = None

    def command(self, argv: list[str]) -> list[str]:
        return ["/bin/sh", "-c", ENTER, str(self.path / "cgroup.procs"), *argv]

    def started(self, pid: int) -> None:
        self.main = processes.stat(pid)

    def members(self) -> list[Proc]:
        """The live processes in the step's cgroup (and below it), and its main process."""
        found: dict[int, Proc] = {}
        for pid in _pids(self.path):
            if (p := processes.stat(pid)) is not None and p.alive:
                found[pid] = p
        main = self.main.key if self.main is not None else None
        # the main process until it has entered the cgroup (or if it never could)
        m = processes.stat(main[0]) if main is not None else None
        if m is not None and m.key == main and m.alive:
            found[m.pid] = m
        # a pid that left the cgroup while we looked may already name another process
        listed = _pids(self.path)
        return [p for pid, p in found.items() if pid in listed or p.key == main]

    async def kill(self, grace_s: float) -> int:
        """Kill every process of the step, its main process too; how many others there were."""
        killed = await processes.terminate(
            self.members, grace_s, kill_all=lambda: self.owner.kill_all(self.path)
        )
        return len(killed - {self.main.key}) if self.main is not None else len(killed)

    def release(self) -> None:
        self.owner.remove(self.path)


def _pids(path: Path) -> set[int]:
    """Every pid in cgroup `path` and the cgroups below it."""
    pids: set[int] = set()
    for directory, _, _ in os.walk(path):
        with contextlib.suppress(OSError):
            pids.update(int(line) for line in Path(directory, "cgroup.procs").read_text().split())
    return pids


def _write(path: Path, text: str) -> None:
    # one write(2) per value: cgroupfs takes each write as one request
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _own_cgroup(path: Path) -> str | None:
    """The cgroup v2 path of this process ("0::/system.slice/x.service")."""
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    return None


def _cgroup2_directory(mountinfo: Path, own: str) -> Path | None:
    """Where cgroup `own` is in this mount namespace: below the cgroup2 mount that holds it."""
    with contextlib.suppress(OSError):
        for line in mountinfo.read_text().splitlines():
            fields, _, tail = line.partition(" - ")
            if not tail.startswith("cgroup2 "):
                continue
            root, mount_point = (_unescape(f) for f in fields.split()[3:5])
            prefix = root.rstrip("/")
            if own == root or own.startswith(prefix + "/"):
                return Path(mount_point) / own[len(prefix) :].lstrip("/")
    return None


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in octal (\040)
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _delegated(directory: Path) -> bool:
    """Whether systemd delegated this cgroup: its xattr says so, else the unit's Delegate=."""
    for name in ("trusted.delegate", "user.delegate"):
        with contextlib.suppress(OSError):
            if os.getxattr(directory, name).strip() == b"1":
                return True
    # systemd could not set the xattr (some containers): ask it about the unit
    unit = directory.name
    systemctl = shutil.which("systemctl")
    if systemctl is None or not unit.endswith((".service", ".scope")):
        return False
    try:
        shown = subprocess.run(
            [systemctl, "show", "--property=Delegate", "--value", unit],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return shown.stdout.strip() == "yes"
