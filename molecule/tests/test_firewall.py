"""The tickle-port firewall: table inet tickle, task servers take tickles only from the NS, agents
only from their task servers, CEM agents none; the switch drops every tickle; APIs stay open."""

from __future__ import annotations

import re
import time

import pytest

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


def test_tickle_table_loaded_by_its_unit(any_host: FleetHost) -> None:
    table = _table(any_host)
    assert "hook input" in table
    assert re.search(r"tcp dport \{ 50120, 50121 \} counter packets \d+ bytes \d+ accept", table)
    assert any_host.host.file("/etc/tickle/firewall.nft").exists


def test_task_server_accepts_tickles_only_from_the_ns(fleet: Fleet, task_server: FleetHost) -> None:
    table = _table(task_server)
    assert set(fleet.ns.ipv4_addresses()) <= _set_elements(table, "notification_servers_v4")
    assert re.search(r"udp dport 50123 ip saddr @notification_servers_v4 counter .* accept", table)
    _drop_counter(table, 50123)


def test_stray_datagram_to_task_server_is_dropped(fleet: Fleet, task_server: FleetHost) -> None:
    senders = [h for h in fleet.hosts if not h.is_ns and h is not task_server]
    if not senders:
        pytest.skip("no host other than the NS to send from")
    before = _drop_counter(_table(task_server), 50123)
    senders[0].check(_SEND, task_server.ipv4_addresses()[0], "50123")
    deadline = time.monotonic() + 5
    while _drop_counter(_table(task_server), 50123) <= before:
        assert time.monotonic() < deadline, f"datagram from {senders[0]} was not dropped"
        time.sleep(0.2)


def test_agent_accepts_tickles_only_from_its_task_servers(fleet: Fleet, agent: FleetHost) -> None:
    table = _table(agent)
    if agent.tickles_blocked:
        assert re.search(r"udp dport \{ 50123, 50124 \} counter .* drop", table)
        return
    wanted = agent.hostvars.get("tickle_client_task_agent_task_servers")
    servers = [h for h in fleet.task_servers if not isinstance(wanted, list) or h.name in wanted]
    allowed = _set_elements(table, "task_servers_v4")
    for server in servers:
        assert set(server.ipv4_addresses()) <= allowed, f"{server} may not tickle {agent}"
    assert set(fleet.ns.ipv4_addresses()).isdisjoint(allowed) or fleet.ns.is_task_server
    assert re.search(r"udp dport 50124 ip saddr @task_servers_v4 counter .* accept", table)
    _drop_counter(table, 50124)


def test_cem_agent_drops_every_tickle(cem_agent: FleetHost) -> None:
    _drop_counter(_table(cem_agent), 50124)


def test_switch_blocks_tickles_entirely(any_host: FleetHost) -> None:
    if not any_host.tickles_blocked:
        pytest.skip("tickles are not blocked on this host")
    table = _table(any_host)
    first_rule = table.split("policy accept;")[1].strip().splitlines()[0]
    assert re.search(r"udp dport \{ 50123, 50124 \} counter .* drop", first_rule), table
