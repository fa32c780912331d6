"""Secrets a local user could read: a real fleet started by hand with umask 022 keeps every state
directory 0700 and every file in it 0600, and no secret on any process's command line."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.attacks.conftest import start_fleet, stop_fleet
from tests.reliability import record
from tickle.testing.localfleet import AgentSpec, LocalFleet

pytestmark = [pytest.mark.attacks, pytest.mark.integration]

# the files that hold secrets, which must exist for the check to mean anything
SECRET_FILES = {
    "ns": ["ns.db", "ns.db-wal", "ns.db-shm"],
    "ts1": ["task-server.db", "task-server.db-wal", "task-server.db-shm"],
    "pc1": ["agent.db", "agent.db-wal", "agent.db-shm"],
}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    """NS, one task server and one agent, started from a shell whose umask is 022."""
    previous = os.umask(0o022)
    try:
        started = start_fleet(
            tmp_path_factory.mktemp("umask-022"), ["ts1"], [AgentSpec("pc1", ["ts1"])]
        )
    finally:
        os.umask(previous)
    yield started
    stop_fleet(started)


def _open_to_others(state: Path) -> dict[str, str]:
    """Every path in `state` (itself included) that group or others can access, with its mode."""
    found = {}
    for path in [state, *state.rglob("*")]:
        mode = path.lstat().st_mode & 0o777
        if mode & 0o077:
            found[str(path.relative_to(state.parent))] = f"{mode:04o}"
    return found


def test_every_state_dir_and_file_is_private_when_started_with_umask_022(
    fleet: LocalFleet,
) -> None:
    missing = [f"{c}/{n}" for c, names in SECRET_FILES.items() for n in names
               if not (fleet.root / c / n).exists()]  # fmt: skip
    open_to_others = {
        k: v for c in SECRET_FILES for k, v in _open_to_others(fleet.root / c).items()
    }
    modes = {c: f"{(fleet.root / c).stat().st_mode & 0o777:04o}" for c in SECRET_FILES}
    record(
        case="Secrets at rest, started with umask 022",
        done="NS, task server and agent started by hand with umask 022; modes of their state "
        "directories and every file in them (databases, -wal, -shm, socket)",
        outcome="state dirs 0700, every file 0600"
        if not open_to_others and not missing
        else f"open to others: {open_to_others}; missing: {missing}",
        tried=sum(len(list((fleet.root / c).rglob("*"))) + 1 for c in SECRET_FILES),
    )
    assert missing == []
    assert modes == dict.fromkeys(SECRET_FILES, "0700")
    assert open_to_others == {}


def test_no_secret_is_on_any_command_line(fleet: LocalFleet) -> None:
    secrets = {
        "admin token": fleet.admin_token,
        "task servers' enrollment secret": fleet.enrollment_secret,
        "agents' enrollment secret": fleet.agent_enrollment_secret,
    }
    shown = {}
    for name, proc in fleet.procs.items():
        assert proc.popen is not None
        assert proc.popen.poll() is None, f"{name} is not running"
        # /proc/PID/cmdline is readable by every local user
        argv = Path(f"/proc/{proc.popen.pid}/cmdline").read_bytes().decode()
        shown |= {f"{name}: {what}": "on argv" for what, value in secrets.items() if value in argv}
    record(
        case="Secrets on command lines",
        done="/proc/PID/cmdline of the NS, task server and agent a LocalFleet started (as the "
        "demo and the tests do)",
        outcome="no admin token, no enrollment secret" if not shown else str(sorted(shown)),
        tried=len(fleet.procs) * len(secrets),
    )
    assert shown == {}
