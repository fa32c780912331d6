"""The Alembic migrations shipped in the package."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text

from tickle.ns.migrations import current_revision
from tickle.ns.models import Base
from tickle.ns.store import Store


def test_upgrade_head_on_an_empty_sqlite_builds_the_schema_and_is_idempotent(
    tmp_path: Path,
) -> None:
    store = Store(f"sqlite:///{tmp_path / 'ns.db'}")
    try:
        assert current_revision(store.engine) is None
        store.migrate()
        head = current_revision(store.engine)
        assert head is not None
        store.migrate()  # a second start changes nothing
        assert current_revision(store.engine) == head

        tables = set(inspect(store.engine).get_table_names())
        assert set(Base.metadata.tables) <= tables
        with store.engine.connect() as conn:
            # the migrations and the models describe the same schema
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            assert conn.execute(text("SELECT count(*) FROM settings")).scalar() == 1
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert store.settings().task_request_interval_s == 1800
    finally:
        store.close()


def test_status_event_ids_are_unique_in_the_schema(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'ns.db'}")
    try:
        store.migrate()
        uniques = inspect(store.engine).get_unique_constraints("status_events")
        assert ["event_id"] in [u["column_names"] for u in uniques]
    finally:
        store.close()
