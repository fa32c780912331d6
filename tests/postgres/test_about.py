"""GET /api/about of an NS on PostgreSQL: the database it really uses, without the password."""

from __future__ import annotations

import json

import pytest

from tests.ns.conftest import NsFactory, wait_for

from .conftest import PgServer

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
