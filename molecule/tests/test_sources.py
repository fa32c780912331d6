"""Where each host's tickle package came from, and where the notification server keeps its data:
what the inventory says (tickle_install_from, tickle_notification_server_database_url)."""

from __future__ import annotations

import pytest

from fleet import DB_UNIT, Fleet, FleetHost, check_index_served, check_ns_writes_to_postgresql


def test_package_installed_from_the_configured_source(any_host: FleetHost) -> None:
    prefix = str(any_host.hostvars.get("tickle_install_prefix", "/opt/tickle"))
    record = any_host.check(f"cat {prefix}/venv/tickle-source").strip()
    requirement, _, source = record.partition(" from ")
    assert requirement.startswith("tickle"), f"{any_host}: {record!r}"
    if any_host.install_from == "index":
        assert source == (str(any_host.hostvars.get("tickle_install_index_url", "")) or "index")
    else:
        assert source.startswith(f"{prefix}/wheelhouse/"), f"{any_host}: {record!r}"
    version = any_host.check(
        f"{prefix}/venv/bin/python -c 'import importlib.metadata as m; print(m.version(\"tickle\"))'"
    ).strip()
    assert version, f"{any_host}: no tickle distribution in the venv"
    if "==" in requirement:
        assert requirement.split("==", 1)[1] == version, (
            f"{any_host}: {version}, wanted {requirement}"
        )


def test_index_served_every_host_that_installs_from_it(fleet: Fleet) -> None:
    hosts = [h for h in fleet.hosts if h.install_from == "index"]
    if not hosts:
        pytest.skip("no host installs from a package index")
    if not fleet.services:
        pytest.skip("the package index is the site's own, outside the inventory")
    check_index_served(fleet.services[0], hosts)


def test_notification_server_uses_the_configured_database(fleet: Fleet) -> None:
    about = fleet.ns_api("GET", "/api/about")
    assert about["database"] == fleet.configured_database, about
    assert about["schema_revision"], f"no schema revision stamped: {about}"
    assert about["dispatcher_active"], f"the only NS does not run the tickle dispatcher: {about}"


def test_notification_server_writes_to_postgresql(fleet: Fleet) -> None:
    if fleet.configured_database != "postgresql":
        pytest.skip("the notification server uses SQLite")
    databases = [s for s in fleet.services if s.host.service(DB_UNIT).is_running]
    if not databases:
        pytest.skip("the PostgreSQL server is the site's own, outside the inventory")
    check_ns_writes_to_postgresql(fleet, databases[0])
