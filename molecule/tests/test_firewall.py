"""The tickle-port firewall: table inet tickle, task servers take tickles only from the NS, agents
only from their task servers, CEM agents none; the switch drops every tickle; APIs stay open."""

from __future__ import annotations

import re
import time

from fleet import Fleet, FleetHost

# Sends one UDP datagram (not a valid tickle: it must be dropped before anything reads it).
_SEND = "python3 -c 'import socket,sys; socket.socket(2,2).sendto(b\"stray\",(sys.argv[1],int(sys.argv[2])))' %s %s"


def _table(host: FleetHost) -> str:
    return host.check("nft list table inet tickle")


def _set_elements(table: str, name: str) -> set[str]:
    match = re.search(rf"set {name} \{{(.*?)\}}\s*\n\s*(set|chain)", table, re.S)
    assert match, f"set {name} missing:\n{table}"
    elements = re.search(r"elements = \{(.*?)\}", match.group(1), re.S)
    return {e.strip() for e in elements.group(1).split(",")} if elements else set()


def _drop_counter(table: str, port: int) -> int:
    match = re.search(rf"udp dport {port} counter packets (\d+) bytes \d+ drop", table)
    assert match, f"no drop rule for udp {port}:\n{table}"
    return int(match.group(1))


def _blocked(host: FleetHost) -> str:
    """The switch's rule: both tickle ports (the host's own settings) dropped."""
    return rf"udp dport \{{ {host.ts_tickle_port}, {host.agent_tickle_port} \}} counter .* drop"


def test_tickle_table_loaded_by_its_unit(any_host: FleetHost) -> None:
    table = _table(any_host)
    assert "hook input" in table
    # the ports follow the host's settings (tickle_delivery gives a task server ports of its own)
    ports = ", ".join(str(p) for p in sorted(any_host.api_ports))
    assert re.search(rf"tcp dport \{{ {ports} \}} counter packets \d+ bytes \d+ accept", table), (
        table
    )
    assert any_host.host.file("/etc/tickle/firewall.nft").exists


def test_task_server_accepts_tickles_only_from_the_ns(fleet: Fleet, task_server: FleetHost) -> None:
    table = _table(task_server)
    assert set(fleet.ns.ipv4_addresses()) <= _set_elements(table, "notification_servers_v4")
    port = task_server.ts_tickle_port
    assert re.search(
        rf"udp dport {port} ip saddr @notification_servers_v4 counter .* accept", table
    )
    _drop_counter(table, port)


def _send_stray_and_see_it_dropped(sender: FleetHost, target: FleetHost, port: int) -> None:
    before = _drop_counter(_table(target), port)
    sender.check(_SEND, target.ipv4_addresses()[0], str(port))
    deadline = time.monotonic() + 5
    while _drop_counter(_table(target), port) <= before:
        assert time.monotonic() < deadline, (
            f"a datagram from {sender} to {target}:{port} was not dropped"
        )
        time.sleep(0.2)


def test_stray_datagram_to_task_server_is_dropped(fleet: Fleet, task_server: FleetHost) -> None:
    senders = [h for h in fleet.hosts if not h.is_ns and h is not task_server]
    assert senders, f"no host other than the NS and {task_server} to send from"
    _send_stray_and_see_it_dropped(senders[0], task_server, task_server.ts_tickle_port)


def test_agent_accepts_tickles_only_from_its_task_servers(fleet: Fleet, agent: FleetHost) -> None:
    table = _table(agent)
    if agent.tickles_blocked:
        assert re.search(_blocked(agent), table)
        return
    servers = fleet.task_servers_of(agent)
    assert servers, f"{agent} has no task server in the inventory"
    wanted = {address for server in servers for address in server.ipv4_addresses()}
    allowed = _set_elements(table, "task_servers_v4")
    assert allowed == wanted, (
        f"{agent} takes tickles from {sorted(allowed)}, its task servers {servers} are {sorted(wanted)}"
    )
    port = agent.agent_tickle_port
    assert re.search(rf"udp dport {port} ip saddr @task_servers_v4 counter .* accept", table)
    _drop_counter(table, port)


def test_stray_datagram_to_agent_is_dropped(fleet: Fleet, agent: FleetHost) -> None:
    if agent.tickles_blocked:
        # its one rule drops both tickle ports: headline_blocked_tickle_polling sends to it
        assert re.search(_blocked(agent), _table(agent))
        return
    servers = fleet.task_servers_of(agent)
    senders = [h for h in fleet.hosts if h is not agent and h not in servers]
    assert senders, f"no host other than {agent}'s task servers to send from"
    _send_stray_and_see_it_dropped(senders[0], agent, agent.agent_tickle_port)


def test_cem_agent_drops_every_tickle(cem_agent: FleetHost) -> None:
    _drop_counter(_table(cem_agent), cem_agent.agent_tickle_port)


def test_switch_blocks_tickles_entirely_where_set(any_host: FleetHost) -> None:
    table = _table(any_host)
    block = re.compile(_blocked(any_host))
    if any_host.tickles_blocked:
        first_rule = table.split("policy accept;")[1].strip().splitlines()[0]
        assert block.search(first_rule), f"{any_host}: tickles not blocked first:\n{table}"
    else:
        assert not block.search(table), f"{any_host}: tickles blocked without the switch:\n{table}"
