"""Cancel and step output on PostgreSQL: the same scenario as on SQLite (row locks, text)."""

from __future__ import annotations

import pytest

from tests.ns.conftest import NsFactory
from tests.ns.test_api import cancel_and_output_scenario

from .conftest import PgServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_cancel_and_output_on_postgres(
    postgres: PgServer, pg_database: str, ns_factory: NsFactory
) -> None:
    # (ns_factory after pg_database: the NS stops before its database is dropped)
    ns = await ns_factory(database_url=postgres.url(pg_database))
    await cancel_and_output_scenario(ns)
