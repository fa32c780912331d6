"""Every host runs its tickle units, listens where it should, and is registered."""

from __future__ import annotations

from fleet import AGENT_CONFIG, TS_CONFIG, Fleet, FleetHost


def test_units_enabled_and_active(any_host: FleetHost) -> None:
    for unit in any_host.units:
        service = any_host.host.service(unit)
        assert service.is_enabled, f"{any_host}: {unit} is not enabled"
        assert service.is_running, f"{any_host}: {unit} is not active"


def test_notification_server_answers_health(fleet: Fleet) -> None:
    assert fleet.ns_api("GET", "/health")["status"] == "ok"


def test_task_server_answers_health(task_server: FleetHost) -> None:
    assert task_server.local_api(TS_CONFIG, "GET", "/health")["status"] == "ok"


def test_task_server_listens_for_tickles_on_its_udp_port(task_server: FleetHost) -> None:
    port = task_server.ts_tickle_port
    assert task_server.host.socket(f"udp://0.0.0.0:{port}").is_listening


def test_agent_listens_for_tickles_on_its_udp_port(agent: FleetHost) -> None:
    port = agent.agent_tickle_port
    assert agent.host.socket(f"udp://0.0.0.0:{port}").is_listening


def test_agents_registered_with_their_first_task_server(fleet: Fleet) -> None:
    computers = fleet.computers()
    names = {
        h.name: str(h.hostvars.get("tickle_task_server_name", h.name)) for h in fleet.task_servers
    }
    for agent in fleet.agents:
        assert agent.computer_name in computers, f"{agent} is not registered at the NS"
        status = agent.agent_status()
        assert status["registered"], f"{agent}: {status}"
        wanted = agent.hostvars.get("tickle_client_task_agent_task_servers")
        if isinstance(wanted, list) and wanted and wanted[0] in names:
            assert computers[agent.computer_name]["task_server"] == names[wanted[0]]
        if agent.cem:
            assert computers[agent.computer_name]["tickle_state"] == "cem"


def test_agent_configuration_is_private(any_host: FleetHost) -> None:
    if not any_host.is_agent:
        return
    config = any_host.host.file(AGENT_CONFIG)
    assert config.exists
    assert config.mode & 0o007 == 0, f"{AGENT_CONFIG} is readable by others"
