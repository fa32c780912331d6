"""Headline of the cem_mode scenario: CEM agents open no tickle listener, their task servers send
them no tickles (the counters show each one skipped), and the work arrives by polling. The
scenario also runs as a site with its own services: every host installs the package from the
index on the services host, and the NS keeps its data in PostgreSQL there.

Never skipped: a fleet that does not meet the preconditions fails here, saying which. Run by the
scenario's verify step (molecule.yml: additional_files_or_dirs) and by `make verify HEADLINES=...`.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from fleet import (
    DB_UNIT,
    TS_CONFIG,
    Fleet,
    FleetHost,
    check_index_served,
    check_ns_writes_to_postgresql,
    metric,
    steps,
)

# Longest interval these checks wait through (a real fleet at 30 minutes cannot be checked so).
MAX_INTERVAL_S = 120


@pytest.fixture(scope="module")
def cem(fleet: Fleet) -> list[FleetHost]:
    agents = fleet.cem_agents
    assert agents, f"precondition: no CEM agent (tickle_client_task_agent_cem) among {fleet.agents}"
    interval = fleet.settings()["task_request_interval_s"]
    assert interval <= MAX_INTERVAL_S, (
        f"precondition: the Task Request Interval is {interval} s; at most {MAX_INTERVAL_S} s "
        "can be waited for"
    )
    return agents


def _tickle_counters(server: FleetHost) -> dict[str, float]:
    text = server.local_api(TS_CONFIG, "GET", "/metrics")
    return {
        "sent": metric(text, "tickle_tickles_sent_total", kind="tasks"),
        "resent": metric(text, "tickle_tickles_resent_total", kind="tasks"),
        "skipped_cem": metric(text, "tickle_tickles_skipped_cem_total"),
    }


@pytest.fixture(scope="module")
def cem_run(fleet: Fleet, cem: list[FleetHost]) -> dict[str, Any]:
    """Run `uname -n` now on the CEM agents; the executions and their task servers' counters."""
    settings = fleet.settings()
    computers = fleet.computers()
    serving = Counter(computers[a.computer_name]["task_server"] for a in cem)
    servers = [h for h in fleet.task_servers if h.task_server_name in serving]
    assert {h.task_server_name for h in servers} == set(serving), (
        f"precondition: the CEM agents' task servers {sorted(serving)} are not all in the inventory"
    )
    before = {h.name: _tickle_counters(h) for h in servers}
    run = fleet.run_now("uname -n", cem)
    interval = settings["task_request_interval_s"]
    done = fleet.wait_run(
        run["id"], timeout_s=interval * (1 + settings["poll_jitter_fraction"]) + 15
    )
    time.sleep(1)  # a tickle sent with the last pull would be counted within this second
    after = {h.name: _tickle_counters(h) for h in servers}
    executions = {e["computer"]: fleet.execution(e["id"]) for e in done["executions"]}
    assert set(executions) == {a.computer_name for a in cem}, sorted(executions)
    return {"servers": servers, "serving": serving, "before": before, "after": after,
            "executions": executions}  # fmt: skip


def test_cem_agent_opens_no_tickle_socket(cem: list[FleetHost]) -> None:
    for agent in cem:
        port = int(agent.hostvars.get("tickle_client_task_agent_tickle_port", 50124))
        sockets = agent.check("ss -Hlun")
        assert f":{port} " not in sockets, f"{agent} has a UDP socket on {port}:\n{sockets}"
        status = agent.agent_status()
        assert status["registered"], f"{agent} is not registered: {status}"
        assert status["tickle_listener"] is None, f"{agent}: {status}"


def test_cem_agents_get_work_by_polling(cem_run: dict[str, Any]) -> None:
    for who, execution in cem_run["executions"].items():
        assert execution["status"] == "succeeded", f"{who}: {execution}"
        assert execution["via"] == "poll", f"{who} got its work by {execution['via']}"
        assert steps(execution)["agent_tickled"] is None, f"{who} was tickled"


def test_task_servers_send_cem_agents_no_tickles(cem_run: dict[str, Any]) -> None:
    for ts in cem_run["servers"]:
        before, after = cem_run["before"][ts.name], cem_run["after"][ts.name]
        assert after["sent"] == before["sent"], f"{ts} sent tickles: {before} -> {after}"
        assert after["resent"] == before["resent"], f"{ts} resent tickles: {before} -> {after}"
        # Each CEM agent with work is a tickle skipped, at every work pull until it pulls.
        skipped = after["skipped_cem"] - before["skipped_cem"]
        assert skipped >= cem_run["serving"][ts.task_server_name], (
            f"{ts} did not count its CEM agents' tickles as skipped: {before} -> {after}"
        )


def test_ns_shows_the_agents_in_cem_mode(fleet: Fleet, cem: list[FleetHost]) -> None:
    computers = fleet.computers()
    states = {a.computer_name: computers[a.computer_name]["tickle_state"] for a in cem}
    assert all(s == "cem" for s in states.values()), states


def test_every_host_installs_from_the_services_index(fleet: Fleet) -> None:
    assert fleet.services, "precondition: no site-services host (group testbed_services)"
    pip_hosts = [h for h in fleet.hosts if h.install_from != "index"]
    assert not pip_hosts, f"precondition: hosts not installing from the index: {pip_hosts}"
    check_index_served(fleet.services[0], fleet.hosts)


def test_notification_server_keeps_its_data_in_postgresql(fleet: Fleet) -> None:
    assert fleet.configured_database == "postgresql", (
        "precondition: tickle_notification_server_database_url is not a PostgreSQL URL"
    )
    databases = [s for s in fleet.services if s.host.service(DB_UNIT).is_running]
    assert databases, (
        f"precondition: PostgreSQL ({DB_UNIT}) runs on no services host {fleet.services}"
    )
    check_ns_writes_to_postgresql(fleet, databases[0])
