"""What an operator does to a deployed fleet, run by the tickle_delivery scenario's verify step
after every other check: dry runs report drift, --diff shows the configuration without secrets,
--limit works on one host (every run below but the NS's is limited to one host), a flushed firewall table is loaded again, bad settings stop before
anything is written (with a message naming them), and a unit that fails is reported at once with
its journal.

Each check runs the repository's playbooks with ansible-playbook against the scenario's inventory
and leaves the fleet as the scenario deployed it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from fleet import NS_CONFIG, TS_CONFIG, Fleet, FleetHost, Run, wait_for


def _extra(values: dict[str, Any]) -> list[str]:
    return ["-e", json.dumps(values)]


def _secrets(host: FleetHost, config: str) -> list[str]:
    """The secret values in the secrets file a host's configuration names."""
    secrets_file = config.replace(".toml", ".secrets.toml")
    text = host.check(f"cat {secrets_file}")
    return re.findall(r'^\w+ = "(.*)"$', text, re.M)


@pytest.fixture(scope="module")
def ts1(fleet: Fleet) -> FleetHost:
    return fleet.task_servers[0]


@pytest.fixture(scope="module")
def agent1(fleet: Fleet) -> FleetHost:
    return fleet.tickle_reachable_agents[0]


def test_dry_run_reports_settings_drift_and_diffs_the_configuration(fleet: Fleet) -> None:
    ns = fleet.ns
    wanted = fleet.settings()["task_request_interval_s"]
    fleet.ns_api("PUT", "/api/settings", {"task_request_interval_s": wanted + 60})
    try:
        run = Run(fleet, "notification_servers.yml", "--check", "--diff",
                  *_extra({"tickle_notification_server_log_level": "DEBUG"}))  # fmt: skip
        assert run.rc == 0, run
        assert "Would change the central settings" in run.out, run
        assert run.recap(ns)["changed"] >= 2, run
        # the configuration's diff is shown, the secrets are not
        assert '-log_level = "INFO"' in run.out, run
        assert '+log_level = "DEBUG"' in run.out, run
        for secret in _secrets(ns, NS_CONFIG):
            assert secret not in run.out, "a secret shows in the --diff output"
        # a dry run changed nothing
        assert fleet.settings()["task_request_interval_s"] == wanted + 60
        assert 'log_level = "INFO"' in ns.check(f"cat {NS_CONFIG}")
    finally:
        fleet.ns_api("PUT", "/api/settings", {"task_request_interval_s": wanted})


def test_flushed_firewall_table_is_loaded_again_on_a_limited_run(
    fleet: Fleet, agent1: FleetHost
) -> None:
    loaded = agent1.check("nft -s list table inet tickle")
    agent1.check("nft flush table inet tickle")
    run = Run(fleet, "firewall.yml", "--limit", agent1.name)
    assert run.rc == 0, run
    assert run.recap(agent1)["changed"] == 1, run
    assert agent1.check("nft -s list table inet tickle") == loaded
    again = Run(fleet, "firewall.yml", "--limit", agent1.name)
    assert again.rc == 0, again
    assert again.recap(agent1)["changed"] == 0, again


def test_port_out_of_range_stops_before_anything_is_written(fleet: Fleet, ts1: FleetHost) -> None:
    before = ts1.check(f"cat {TS_CONFIG}")
    run = Run(fleet, "task_servers.yml", "--limit", ts1.name,
              *_extra({"tickle_task_server_api_port": 70000}))  # fmt: skip
    assert run.rc != 0, run
    assert "tickle_task_server_api_port is 70000" in run.out, run
    assert ts1.check(f"cat {TS_CONFIG}") == before


def test_setting_the_component_refuses_is_not_written(fleet: Fleet, ts1: FleetHost) -> None:
    before = ts1.check(f"cat {TS_CONFIG}")
    run = Run(fleet, "task_servers.yml", "--limit", ts1.name,
              *_extra({"tickle_task_server_extra_config": {"max_connections": 1}}))  # fmt: skip
    assert run.rc != 0, run
    assert "max_connections" in run.out, run
    assert "failed to validate" in run.out, run
    assert ts1.check(f"cat {TS_CONFIG}") == before
    assert ts1.host.service("tickle-task-server.service").is_running


def test_extra_config_that_is_not_toml_is_refused(fleet: Fleet, agent1: FleetHost) -> None:
    run = Run(fleet, "client_task_agents.yml", "--limit", agent1.name, "--check",
              *_extra({"tickle_client_task_agent_extra_config": {"log_level": "DEBUG", "nested": {"a": 1}}}))  # fmt: skip
    assert run.rc != 0, run
    assert "log_level is set by the role itself" in run.out, run
    assert "nested" in run.out, run
    assert "is not a string, number, boolean or list" in run.out, run


def test_missing_agent_user_is_named(fleet: Fleet, agent1: FleetHost) -> None:
    run = Run(fleet, "client_task_agents.yml", "--limit", agent1.name, "--check",
              *_extra({"tickle_client_task_agent_user": "tickle-nosuchuser"}))  # fmt: skip
    assert run.rc != 0, run
    assert "the user 'tickle-nosuchuser' does not exist" in run.out, run


def test_api_refusal_names_the_field_without_the_token(fleet: Fleet) -> None:
    run = Run(fleet, "set_interval.yml", *_extra({"tickle_task_request_interval_s": 2}))
    assert run.rc != 0, run
    assert re.search(
        r"task_request_interval_s:\s+Input should be greater than or equal to 10", run.out
    ), run
    for secret in _secrets(fleet.ns, NS_CONFIG):
        assert secret not in run.out, "the admin token shows in the output"


def test_failing_unit_is_reported_at_once_with_its_journal(fleet: Fleet, ts1: FleetHost) -> None:
    # an address the host does not have: the configuration is valid, the bind fails at start
    before = ts1.check(f"cat {TS_CONFIG}")
    try:
        run = Run(fleet, "task_servers.yml", "--limit", ts1.name,
                  *_extra({"tickle_task_server_api_host": "192.0.2.1",
                           "tickle_task_server_health_timeout_s": 600}))  # fmt: skip
        assert run.rc != 0, run
        assert "tickle-task-server.service failed" in run.out, run
        assert "its journal" in run.out, run
        # the journal's own words: the task server could not bind the address
        assert "cannot start: [Errno 99]" in run.out, run
        # far less than the health timeout: it did not wait for it
        assert run.took < 300, run
    finally:
        # the configuration as deployed, and the unit running again
        ts1.check("printf '%%s' %s > %s", before, TS_CONFIG)
        ts1.check(
            "systemctl reset-failed tickle-task-server.service; systemctl restart tickle-task-server.service"
        )

    def healthy() -> bool | None:
        try:
            return ts1.local_api(TS_CONFIG, "GET", "/health")["status"] == "ok" or None
        except AssertionError:  # not listening yet
            return None

    wait_for(f"{ts1} answers GET /health again", healthy, timeout_s=120)
