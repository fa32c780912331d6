"""Headline of the blocked_tickle_polling scenario: the firewall switch drops every tickle to the
agents; with a short Task Request Interval set centrally, the task is not on the agents before
their first poll and is there after it (by poll), and the NS shows them tickle-unreachable.

Never skipped: a fleet that does not meet the preconditions fails here, saying which. Run by the
scenario's verify step (molecule.yml: additional_files_or_dirs) and by `make verify HEADLINES=...`.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from fleet import Fleet, FleetHost, steps, wait_for

# Longest interval these checks wait through (a real fleet at 30 minutes cannot be checked so).
MAX_INTERVAL_S = 120
# how far off every blocked agent's next poll must be when the run is made: the run-now, the second
# below and the look at the agents took 5.3 s on a loaded CI machine (3 s was too little)
QUIET_S = 8.0
# Sends one UDP datagram from a host (not a valid tickle: the firewall must drop it first).
_SEND = "python3 -c 'import socket,sys; socket.socket(2,2).sendto(b\"stray\",(sys.argv[1],int(sys.argv[2])))' %s %s"
_BLOCK_RULE = re.compile(r"udp dport \{ (\d+), (\d+) \} counter packets (\d+) bytes \d+ drop")


@pytest.fixture(scope="module")
def blocked(fleet: Fleet) -> list[FleetHost]:
    agents = fleet.blocked_agents
    assert agents, (
        "precondition: no agent with tickles blocked (tickle_firewall_block_tickles) among "
        f"{fleet.agents}"
    )
    interval = fleet.settings()["task_request_interval_s"]
    assert interval <= MAX_INTERVAL_S, (
        f"precondition: the Task Request Interval is {interval} s; at most {MAX_INTERVAL_S} s "
        "can be waited for"
    )
    return agents


@pytest.fixture(scope="module")
def blocked_run(fleet: Fleet, blocked: list[FleetHost]) -> dict[str, Any]:
    """Run a task now on the blocked agents at a moment none of them is about to poll."""
    settings = fleet.settings()
    interval = settings["task_request_interval_s"]

    def quiet_moment() -> dict[str, float] | None:
        status = {a.name: a.agent_status() for a in blocked}
        for name, s in status.items():
            assert s["policy"]["task_request_interval_s"] == interval, (
                f"{name} has not got the central interval: {s['policy']}"
            )
        next_polls = {name: s["next_poll_at"] for name, s in status.items()}
        if all(t is not None and t > time.time() + QUIET_S for t in next_polls.values()):
            return next_polls
        return None

    next_polls = wait_for("a moment when no blocked agent is about to poll", quiet_moment,
                          timeout_s=interval * 3, every_s=0.5)  # fmt: skip
    run = fleet.run_now("uname -n", blocked)
    created = time.time()
    time.sleep(1.0)  # a tickle that got through would have made the agents pull within this second
    early = {a.name: a.agent_status() for a in blocked}
    early_run = fleet.ns_api("GET", f"/api/runs/{run['id']}")
    early_at = time.time()
    assert early_at < min(next_polls.values()), (
        f"precondition: the look before the first poll came too late ({early_at} >= {next_polls})"
    )
    return {
        "settings": settings, "next_polls": next_polls, "run": run, "created": created,
        "early": early, "early_run": early_run,
    }  # fmt: skip


def test_firewall_drops_every_tickle_to_the_blocked_agents(
    fleet: Fleet, blocked: list[FleetHost]
) -> None:
    for agent in blocked:
        table = agent.check("nft list table inet tickle")
        first_rule = table.split("policy accept;")[1].strip().splitlines()[0]
        match = _BLOCK_RULE.search(first_rule)
        assert match, f"{agent}: the first rule does not drop the tickle ports:\n{table}"
        server = fleet.task_servers_of(agent)[0]
        before = int(match.group(3))
        server.check(_SEND, agent.ipv4_addresses()[0], str(agent.agent_tickle_port))

        def dropped(agent: FleetHost = agent, before: int = before) -> bool | None:
            found = _BLOCK_RULE.search(agent.check("nft list table inet tickle"))
            return True if found and int(found.group(3)) > before else None

        wait_for(f"a datagram from its task server {server} dropped by {agent}", dropped, 5, 0.2)


def test_task_is_not_there_before_the_first_poll(
    blocked: list[FleetHost], blocked_run: dict[str, Any]
) -> None:
    by_computer = {e["computer"]: e for e in blocked_run["early_run"]["executions"]}
    assert set(by_computer) == {a.computer_name for a in blocked}, by_computer
    for agent in blocked:
        status = blocked_run["early"][agent.name]
        last_pull = status["last_pull_at"] or 0
        assert last_pull < blocked_run["created"], f"{agent} pulled before its poll: {status}"
        assert by_computer[agent.computer_name]["status"] not in {"running", "succeeded"}


def test_task_arrives_with_the_poll(
    fleet: Fleet, blocked: list[FleetHost], blocked_run: dict[str, Any]
) -> None:
    settings = blocked_run["settings"]
    wait = settings["task_request_interval_s"] * (1 + settings["poll_jitter_fraction"]) + 15
    done = fleet.wait_run(blocked_run["run"]["id"], timeout_s=wait)
    by_computer = {a.computer_name: a for a in blocked}
    assert {e["computer"] for e in done["executions"]} == set(by_computer), done
    for summary in done["executions"]:
        execution = fleet.execution(summary["id"])
        who = execution["computer"]
        agent = by_computer[who]
        assert execution["status"] == "succeeded", f"{who}: {execution}"
        assert execution["via"] == "poll", f"{who} got its work by {execution['via']}"
        pulled = steps(execution)["agent_pulled"]
        assert pulled is not None, f"{who} never pulled"
        assert pulled >= blocked_run["next_polls"][agent.name] - 1.0, (
            f"{who} pulled at {pulled}, before its poll at {blocked_run['next_polls'][agent.name]}"
        )


def test_ns_shows_blocked_agents_tickle_unreachable(
    fleet: Fleet, blocked: list[FleetHost], blocked_run: dict[str, Any]
) -> None:
    # The task server gives up after its last resend (about 15 s with the default backoff).
    names = {a.computer_name for a in blocked}

    def all_unreachable() -> dict[str, str] | None:
        computers = fleet.computers()
        missing = names - set(computers)
        assert not missing, f"not registered at the NS: {sorted(missing)}"
        states = {n: computers[n]["tickle_state"] for n in names}
        return states if all(s == "unreachable" for s in states.values()) else None

    wait_for("the blocked agents shown tickle-unreachable", all_unreachable, 60)
