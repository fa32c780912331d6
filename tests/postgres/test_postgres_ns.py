"""The NS on PostgreSQL: migrations on an empty database, a whole run-now through real processes."""

from __future__ import annotations

import pytest
from alembic.script import ScriptDirectory

from tests.integration.conftest import Factory, eventually, run_command, wait_run
from tickle.console import timeline_times
from tickle.ns.migrations import alembic_config
from tickle.testing.localfleet import AgentSpec

from .conftest import PgServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _rows(postgres: PgServer, database: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    with postgres.connect(database) as conn:
        return conn.execute(sql, params).fetchall()


async def test_ns_migrates_an_empty_postgres_database_and_records_a_run_now(
    fleet_factory: Factory, postgres: PgServer, pg_database: str
) -> None:
    tables = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    assert _rows(postgres, pg_database, tables) == []
    fleet = await fleet_factory(
        ["ts1"], [AgentSpec("a1", ["ts1"])],
        ns_extra=["--database-url", postgres.url(pg_database)],
    )  # fmt: skip
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert _rows(postgres, pg_database, "SELECT version_num FROM alembic_version") == [(head,)]
    assert {"executions", "status_events", "execution_pulls"} <= {
        str(r[0]) for r in _rows(postgres, pg_database, tables)
    }
    assert "postgresql+psycopg://" in fleet.log_tail("ns", 200)

    run = await run_command(fleet, ["a1"], ["echo", "hello-postgres"])
    run = await wait_run(fleet, run.id, 20)  # the interval is 1800 s: only tickles explain this
    execution = run.executions[0]
    assert execution.status == "succeeded", execution
    assert execution.via == "tickle"
    assert "hello-postgres" in (execution.output_tail or "")
    assert all(at is not None for at in timeline_times(execution).values()), execution.timeline

    wanted = {"agent_tickled", "agent_pulled", "started", "finished"}
    count_sql = "SELECT kind, count(*) FROM status_events WHERE execution_id = %s GROUP BY kind"

    async def every_kind_recorded() -> dict[str, int] | None:
        counts = {str(k): int(n) for k, n in _rows(postgres, pg_database, count_sql, execution.id)}  # type: ignore[call-overload]
        return counts if wanted <= set(counts) else None

    counts = await eventually(every_kind_recorded, 10, "every status event in PostgreSQL")
    assert counts == dict.fromkeys(wanted, 1), counts
