"""Fixtures of the fleet checks: the fleet from the Ansible inventory, one test per host.

The inventory is testinfra's --ansible-inventory (Molecule passes its own; `make verify` passes
INVENTORY). When a check fails, the journal of the tickle units of the hosts it used is printed.
"""

from __future__ import annotations

from typing import Any

import pytest

from fleet import Fleet, FleetHost

_fleet: Fleet | None = None


def _load(config: pytest.Config) -> Fleet:
    global _fleet
    if _fleet is None:
        inventory = config.getoption("ansible_inventory", None)
        if not inventory:
            raise pytest.UsageError("give the fleet's inventory: --ansible-inventory=PATH")
        _fleet = Fleet.from_inventory(inventory)
    return _fleet


@pytest.fixture(scope="session")
def fleet(request: pytest.FixtureRequest) -> Fleet:
    return _load(request.config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize by host: `any_host`, `task_server`, `agent` (non-CEM), `cem_agent`."""
    picks = {
        "any_host": lambda h: True,
        "task_server": lambda h: h.is_task_server,
        "agent": lambda h: h.is_agent and not h.cem,
        "cem_agent": lambda h: h.is_agent and h.cem,
    }
    for name, pick in picks.items():
        if name in metafunc.fixturenames:
            hosts = [h for h in _load(metafunc.config).hosts if pick(h)]
            skip = pytest.mark.skip(reason=f"no host of that kind ({name}) in this fleet")
            metafunc.parametrize(name, hosts or [pytest.param(None, marks=skip)], ids=repr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    report = yield
    if report.when == "call" and report.failed:
        hosts: list[FleetHost] = [
            v for v in getattr(item, "funcargs", {}).values() if isinstance(v, FleetHost)
        ]
        fleet = getattr(item, "funcargs", {}).get("fleet")
        if isinstance(fleet, Fleet) and not hosts:
            hosts = fleet.hosts
        for host in hosts:
            try:
                report.sections.append((f"journal {host.name}", host.journal()))
            except Exception as exc:  # the journal is a help, never a second failure
                report.sections.append((f"journal {host.name}", f"unavailable: {exc}"))
    return report
