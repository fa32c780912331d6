"""GET /api/about of an NS on PostgreSQL: the database it really uses, without the password, and
its dispatcher role following the advisory lock (as the tickle_dispatcher_active gauge does)."""

from __future__ import annotations

import json

import pytest

from tests.ns.conftest import NsFactory, wait_for
from tickle.ns.database import DISPATCHER_LOCK_KEY

from .conftest import PgServer, dispatcher_active

pytestmark = [pytest.mark.timeout(60)]
PASSWORD = "pw-that-must-not-show"


async def test_ns_on_postgres_reports_host_port_db_without_password_and_dispatches(
    postgres: PgServer, pg_database: str, ns_factory: NsFactory
) -> None:
    # (ns_factory after pg_database: the NS stops before its database is dropped)
    # the server trusts loopback, so the password is carried but never needed
    url = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:{postgres.port}/{pg_database}"
    ns = await ns_factory(database_url=url)

    async def dispatching() -> dict[str, object] | None:
        body = dict(await ns.ok("GET", "/api/about"))
        return body if body["dispatcher_active"] else None

    body = dict(await wait_for(dispatching, within=15))
    assert body["database"] == "postgresql"
    assert body["database_location"] == f"127.0.0.1:{postgres.port}/{pg_database}"
    assert body["dispatcher_active"] is True
    assert PASSWORD not in json.dumps(body)
    with postgres.connect(pg_database) as conn:
        stamped = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert stamped is not None
    assert body["schema_revision"] == stamped[0]


async def test_ns_on_postgres_reports_standby_until_the_dispatcher_lock_is_free(
    postgres: PgServer, pg_database: str, ns_factory: NsFactory
) -> None:
    holder = postgres.connect(pg_database)  # plays another NS process: it holds the lock
    try:
        taken = holder.execute("SELECT pg_try_advisory_lock(%s)", (DISPATCHER_LOCK_KEY,))
        assert taken.fetchone() == (True,)
        ns = await ns_factory(database_url=postgres.url(pg_database))
        body = await ns.ok("GET", "/api/about")
        assert body["dispatcher_active"] is False
        assert await dispatcher_active(ns.url) == 0
    finally:
        holder.close()  # its session ends: the lock is free

    async def dispatching() -> bool:
        return bool((await ns.ok("GET", "/api/about"))["dispatcher_active"])

    await wait_for(dispatching, within=15)  # the NS retries the lock every 5 s
    assert await dispatcher_active(ns.url) == 1
