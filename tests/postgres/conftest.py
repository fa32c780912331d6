"""A private PostgreSQL server for the test session, a fresh database per test, and a second NS.

The server runs from Debian's binaries (`scripts/sysdeps.sh` installs the `postgresql` package)
as the `postgres` system user (initdb refuses root), in a temporary directory, listening only on
127.0.0.1 on a free port with its unix socket in that directory, trusting loopback. It is stopped
and removed at the end of the session whatever happens. Without PostgreSQL the tests fail, they
do not skip: the SPEC promises PostgreSQL support.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import NET_BASE, eventually, fleet_factory  # noqa: F401
from tests.ns.conftest import ns_factory  # noqa: F401  (an in-process NS, e.g. on PostgreSQL)
from tickle.testing.localfleet import (
    NS_API_PORT,
    AgentSpec,
    FleetError,
    LocalFleet,
    scrape_metric,
)
from tickle.testing.postgres import PgServer, PostgresError, start_postgres


@pytest.fixture(scope="session")
def postgres() -> Iterator[PgServer]:
    """Start the session's PostgreSQL server; stop it and remove its files at the end."""
    try:
        server = start_postgres()
    except PostgresError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_database(postgres: PgServer) -> Iterator[str]:
    """A new empty database for one test (its name); dropped at the end."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with postgres.connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield name
    with postgres.connect() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url(postgres: PgServer, pg_database: str) -> str:
    """The SQLAlchemy URL of the test's new empty database."""
    return postgres.url(pg_database)


# --- several NS processes on one database ------------------------------------------------------


@dataclass
class NsProcess:
    """An extra NS process beside a fleet's own, sharing its database and secrets."""

    name: str
    host: str
    log: Path
    popen: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{NS_API_PORT}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def spawn_ns(fleet: LocalFleet, name: str, host: str, database_url: str) -> NsProcess:
    """Start another `tickle ns` on `host` with the fleet's admin token, enrollment secret and
    the given database (its own state dir)."""
    argv = [
        sys.executable, "-m", "tickle", "ns", "--api-host", host, "--api-port", str(NS_API_PORT),
        "--state-dir", str(fleet.root / name), "--database-url", database_url,
        "--dispatch-poll-s", "0.2",
    ]  # fmt: skip
    log_path = fleet.root / f"{name}.log"
    with log_path.open("ab") as log:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TICKLE_")}
        env["PYTHONUNBUFFERED"] = "1"
        env["TICKLE_NS_ADMIN_TOKEN"] = fleet.admin_token  # secrets never on argv
        env["TICKLE_NS_ENROLLMENT_SECRET"] = fleet.enrollment_secret
        popen = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return NsProcess(name, host, log_path, popen)


async def dispatcher_active(url: str) -> float | None:
    """The NS's `tickle_dispatcher_active` gauge (None: no answer)."""
    return await scrape_metric(url, "tickle_dispatcher_active", timeout_s=10)  # 2 s: CI missed


@dataclass
class TwoNsFleet:
    """A fleet whose own NS (`ns`) dispatches, plus `ns2` on the same database, which the task
    servers talk to."""

    fleet: LocalFleet
    ns2: NsProcess
    database_url: str


TwoNsFactory = Callable[[list[str], list[AgentSpec]], Awaitable[TwoNsFleet]]


@pytest.fixture
async def two_ns_fleet(tmp_path: Path, pg_url: str) -> AsyncIterator[TwoNsFactory]:
    """Start `ns` (waits until it is the dispatcher), then `ns2` on another loopback address,
    then the task servers (pointed at ns2) and agents. Everything stops at the end."""
    started: list[TwoNsFleet] = []
    net = f"127.{NET_BASE}.251"
    ns2_host = f"{net}.200"

    async def make(task_servers: list[str], agents: list[AgentSpec]) -> TwoNsFleet:
        fleet = LocalFleet(
            tmp_path / "fleet",
            task_servers,
            agents,
            net=net,
            ns_extra=["--database-url", pg_url, "--dispatch-poll-s", "0.2"],
            ts_extra=["--ns-url", f"http://{ns2_host}:{NS_API_PORT}"],
        )
        fleet.spawn("ns")
        ns2: NsProcess | None = None
        try:
            await fleet.wait_healthy(fleet.ns_url, "ns", 30)
            await eventually(
                lambda: _is_one(fleet.ns_url), 15, "the first NS to become the dispatcher"
            )
            ns2 = spawn_ns(fleet, "ns2", ns2_host, pg_url)
            started.append(TwoNsFleet(fleet, ns2, pg_url))
            await _wait_ns2(fleet, ns2)
            for name in fleet.ts_hosts:
                fleet.spawn(name)
            for name in fleet.ts_hosts:
                await fleet.wait_healthy(fleet.ts_url(name), name, 30)
            for name in fleet.agents:
                fleet.spawn(name)
            await fleet.wait_registered(list(fleet.agents), 30)
        except BaseException:
            if ns2 is None:
                await fleet.stop()
            raise
        return started[-1]

    yield make
    for two in started:
        await two.fleet.stop()
        two.ns2.stop()


async def _is_one(url: str) -> bool:
    return await dispatcher_active(url) == 1


async def _wait_ns2(fleet: LocalFleet, ns2: NsProcess) -> None:
    try:
        await fleet.wait_healthy(ns2.url, "ns", 30)
    except FleetError:
        raise FleetError(f"ns2 did not start:\n{ns2.log_text()[-3000:]}") from None
    if ns2.popen.poll() is not None:
        raise FleetError(f"ns2 exited with {ns2.popen.returncode}:\n{ns2.log_text()[-3000:]}")
