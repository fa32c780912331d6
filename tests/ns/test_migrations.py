"""The Alembic migrations shipped in the package."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from tickle.ns.database import Database
from tickle.ns.migrations import alembic_config, current_revision, upgrade
from tickle.ns.models import Base
from tickle.ns.stores.settings import SettingsStore


def test_upgrade_head_on_an_empty_sqlite_builds_the_schema_and_is_idempotent(
    tmp_path: Path,
) -> None:
    store = Database(f"sqlite:///{tmp_path / 'ns.db'}")
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
        assert SettingsStore(store).settings().task_request_interval_s == 1800
    finally:
        store.close()


def test_status_event_ids_are_unique_in_the_schema(tmp_path: Path) -> None:
    store = Database(f"sqlite:///{tmp_path / 'ns.db'}")
    try:
        store.migrate()
        uniques = inspect(store.engine).get_unique_constraints("status_events")
        assert ["event_id"] in [u["column_names"] for u in uniques]
    finally:
        store.close()


def test_upgrade_from_0001_keeps_the_data_and_notes_the_pulls_made_so_far(tmp_path: Path) -> None:
    store = Database(f"sqlite:///{tmp_path / 'ns.db'}")
    try:
        upgrade(store.engine, "0001")
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO task_servers (id, name, token_sha256, tickle_key, tickle_host,"
                    " tickle_port, api_url, tickle_state, registered_at)"
                    " VALUES (1, 'ts1', 'x', 'k', '127.0.0.1', 50123, 'http://ts1', 'unknown', 1)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO computers (id, name, task_server_id, token_sha256, tickle_key,"
                    " tickle_port, cem, groups, nat_detected, tickle_state)"
                    " VALUES (1, 'pc1', 1, 'y', 'k', 50124, 0, '[]', 0, 'unknown')"
                )
            )
            conn.execute(text("INSERT INTO runs (id, created_at) VALUES (1, 1)"))
            for ex_id, pulled_at in ((1, "5.0"), (2, "NULL")):
                conn.execute(
                    text(
                        "INSERT INTO executions (id, run_id, computer_id, kind, steps, status,"
                        " step_results, created_at, ts_pulled_at)"
                        f" VALUES ({ex_id}, 1, 1, 'task', '[]', 'pending', '[]', 1, {pulled_at})"
                    )
                )
        assert current_revision(store.engine) == "0001"

        upgrade(store.engine, "0002")

        assert current_revision(store.engine) == "0002"
        with store.engine.connect() as conn:
            pulls = conn.execute(text("SELECT * FROM execution_pulls")).all()
            assert [tuple(r) for r in pulls] == [(1, 1, 5.0)]  # only the one pulled so far
            assert conn.execute(text("SELECT count(*) FROM executions")).scalar() == 2
    finally:
        store.close()


def test_upgrade_from_0002_adds_tickle_pulled_at_empty_and_keeps_last_pull_at(
    tmp_path: Path,
) -> None:
    store = Database(f"sqlite:///{tmp_path / 'ns.db'}")
    try:
        upgrade(store.engine, "0002")
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO task_servers (id, name, token_sha256, tickle_key, tickle_host,"
                    " tickle_port, api_url, tickle_state, registered_at, last_pull_at,"
                    " settings_pulled_at)"
                    " VALUES (1, 'ts1', 'x', 'k', '127.0.0.1', 50123, 'http://ts1', 'reachable',"
                    " 1, 7.0, 8.0)"
                )
            )

        store.migrate()

        assert current_revision(store.engine) == _head()
        with store.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            row = conn.execute(
                text(
                    "SELECT name, last_pull_at, tickle_pulled_at, settings_pulled_at"
                    " FROM task_servers"
                )
            ).one()
            # a pull before the upgrade is not known to be tickle-caused
            assert tuple(row) == ("ts1", 7.0, None, 8.0)
    finally:
        store.close()


def test_upgrade_from_0003_leaves_identities_unknown_so_the_next_registration_keeps_its_own(
    tmp_path: Path,
) -> None:
    store = Database(f"sqlite:///{tmp_path / 'ns.db'}")
    try:
        upgrade(store.engine, "0003")
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO task_servers (id, name, token_sha256, tickle_key, tickle_host,"
                    " tickle_port, api_url, tickle_state, registered_at)"
                    " VALUES (1, 'ts1', 'x', 'k', '127.0.0.1', 50123, 'http://ts1', 'unknown', 1)"
                )
            )
        upgrade(store.engine, "0004_registration_approval")
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT identity_sha256 FROM task_servers")).all() == [(None,)]
            assert conn.execute(text("SELECT count(*) FROM registrations")).scalar() == 0
    finally:
        store.close()


def test_upgrade_from_0004_adds_clock_offsets_unmeasured(tmp_path: Path) -> None:
    store = Database(f"sqlite:///{tmp_path / 'ns.db'}")
    try:
        upgrade(store.engine, "0004_registration_approval")
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO task_servers (id, name, token_sha256, tickle_key, tickle_host,"
                    " tickle_port, api_url, tickle_state, registered_at)"
                    " VALUES (1, 'ts1', 'x', 'k', '127.0.0.1', 50123, 'http://ts1', 'reachable',"
                    " 1)"
                )
            )

        store.migrate()

        with store.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            row = conn.execute(text("SELECT name, clock_offset_s FROM task_servers")).one()
            assert tuple(row) == ("ts1", None)  # not measured before its next request
    finally:
        store.close()


def test_upgrade_from_0003_names_existing_runs_after_their_task_or_job(tmp_path: Path) -> None:
    store = Database(f"sqlite:///{tmp_path / 'ns.db'}")
    try:
        upgrade(store.engine, "0003")
        with store.engine.begin() as conn:
            conn.execute(text("INSERT INTO tasks (id, name, timeout_s) VALUES (1, 'backup', 30)"))
            conn.execute(text("INSERT INTO jobs (id, name) VALUES (1, 'nightly')"))
            conn.execute(
                text("INSERT INTO runs (id, task_id, job_id, created_at) VALUES (1, 1, NULL, 1.0),"
                     " (2, NULL, 1, 2.0)")
            )  # fmt: skip
        store.migrate()
        with store.engine.connect() as conn:
            labels = conn.execute(text("SELECT id, label FROM runs ORDER BY id")).all()
        assert [tuple(r) for r in labels] == [(1, "backup"), (2, "nightly")]
    finally:
        store.close()


def test_upgrade_from_0007_adds_the_console_tables_empty_and_keeps_the_runs(
    tmp_path: Path,
) -> None:
    store = Database(f"sqlite:///{tmp_path / 'ns.db'}")
    try:
        upgrade(store.engine, "0007_output_cancel")
        with store.engine.begin() as conn:
            conn.execute(text("INSERT INTO runs (id, created_at) VALUES (1, 3.0)"))

        store.migrate()

        assert current_revision(store.engine) == _head()
        with store.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            for table in ("operators", "console_sessions", "audit_events"):
                assert conn.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0
            assert conn.execute(text("SELECT created_at FROM runs")).scalar() == 3.0
    finally:
        store.close()


def test_upgrade_from_0008_keeps_the_settings_with_long_poll_off(tmp_path: Path) -> None:
    store = Database(f"sqlite:///{tmp_path / 'ns.db'}")
    try:
        upgrade(store.engine, "0008_console_audit")
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE settings SET version = 7, task_request_interval_s = 600"))

        store.migrate()

        assert current_revision(store.engine) == _head()
        with store.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            row = conn.execute(
                text(
                    "SELECT version, task_request_interval_s, long_poll, long_poll_timeout_s"
                    " FROM settings"
                )
            ).one()
        # CEM agents keep polling, as in the original, until an operator turns long-poll on
        assert tuple(row) == (7, 600, 0, 55)
    finally:
        store.close()


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head
