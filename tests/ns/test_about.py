"""GET /api/about and `tickle about`: which database a running NS really uses (never its
credentials), the schema revision stamped there, and whether it is the tickle dispatcher."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import pytest
from alembic.script import ScriptDirectory

from tests.ns.conftest import ADMIN, Ns, wait_for
from tickle.ns.about import database_location, package_version
from tickle.ns.migrations import alembic_config


def newest_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


async def about_when_dispatching(ns: Ns) -> dict[str, object]:
    """The about body once the dispatcher's first pass made this process the dispatcher."""

    async def probe() -> dict[str, object] | None:
        body = dict(await ns.ok("GET", "/api/about"))
        return body if body["dispatcher_active"] else None

    return dict(await wait_for(probe, within=10))


async def test_sqlite_ns_reports_its_file_newest_revision_and_dispatcher_role(ns: Ns) -> None:
    before = time.time()
    body = await about_when_dispatching(ns)
    assert body["component"] == "ns"
    assert body["version"] == package_version() != "unknown"
    assert body["database"] == "sqlite"
    assert body["database_location"] == str(ns.settings.state_dir / "ns.db")
    assert body["schema_revision"] == newest_revision()
    assert body["dispatcher_active"] is True
    assert isinstance(body["started_at"], float)
    assert before - 60 < body["started_at"] <= time.time()


async def test_about_refuses_missing_wrong_and_misplaced_tokens(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    agent = await ts.agent("pc1")
    assert (await ns.call("GET", "/api/about", token=None))[0] == 401
    assert (await ns.call("GET", "/api/about", token="not-a-token"))[0] == 401
    assert (await ts.call("GET", "/api/about"))[0] == 403
    assert (await ns.call("GET", "/api/about", token=agent["token"]))[0] == 403


@pytest.mark.parametrize(
    ("url", "location"),
    [
        ("postgresql+psycopg://tickle:s3cr3t-pw@db.example:6543/tickle", "db.example:6543/tickle"),
        ("postgresql://tickle:s3cr3t-pw@db.example/tickle", "db.example:5432/tickle"),
        ("postgresql+psycopg://tickle:s3cr3t-pw@/tickle?host=/run/postgresql",
         "/run/postgresql:5432/tickle"),
        ("sqlite:////var/lib/tickle/ns.db", "/var/lib/tickle/ns.db"),
    ],
)  # fmt: skip
def test_database_location_never_shows_the_user_or_password(url: str, location: str) -> None:
    shown = database_location(url)
    assert shown == location
    assert "s3cr3t-pw" not in shown
    assert "tickle:" not in shown
    assert "@" not in shown


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_about_command_prints_the_database_of_a_running_ns(ns: Ns) -> None:
    await about_when_dispatching(ns)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKLE_")}
    env["COLUMNS"] = "300"  # rich wraps table cells to the terminal width: keep the path whole
    base = [sys.executable, "-m", "tickle", "--ns-url", ns.url, "--admin-token", ADMIN, "about"]
    location = str(ns.settings.state_dir / "ns.db")

    table = await tickle(base, env)
    assert "sqlite" in table
    assert location in table
    assert newest_revision() in table
    assert "active" in table

    answer = json.loads(await tickle([*base, "--json"], env))
    assert answer["database"] == "sqlite"
    assert answer["database_location"] == location


async def tickle(argv: list[str], env: dict[str, str]) -> str:
    """Run a `tickle` command as an operator would (the NS serves on this event loop)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    return stdout.decode()
