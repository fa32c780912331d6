"""Blocked-tickle polling: with tickles dropped by the firewall and a short Task Request Interval
set centrally, the task is not on the agent before its first poll and is there after it, and the
NS shows those agents tickle-unreachable."""

from __future__ import annotations

import time
from typing import Any

import pytest

from fleet import Fleet, FleetHost, steps

# Longest interval a test waits through; longer intervals (a real fleet at 30 minutes) are skipped.
MAX_INTERVAL_S = 120


def _blocked_agents(fleet: Fleet) -> list[FleetHost]:
    return [a for a in fleet.agents if a.tickles_blocked and not a.cem]


@pytest.fixture(scope="module")
def blocked_run(fleet: Fleet) -> dict[str, Any]:
    """Run a task now on the blocked agents at a moment none of them is about to poll."""
    agents = _blocked_agents(fleet)
    if not agents:
        pytest.skip("no agent with tickles blocked in this fleet")
    settings = fleet.settings()
    interval = settings["task_request_interval_s"]
    if interval > MAX_INTERVAL_S:
        pytest.skip(f"Task Request Interval {interval} s: too long to wait for in a test")
    deadline = time.time() + interval * 2
    while True:
        status = {a.name: a.agent_status() for a in agents}
        for name, s in status.items():
            assert s["policy"]["task_request_interval_s"] == interval, (
                f"{name} has not got the central interval: {s['policy']}"
            )
        next_polls = {name: s["next_poll_at"] for name, s in status.items()}
        if all(t is not None and t > time.time() + 3 for t in next_polls.values()):
            break
        assert time.time() < deadline, f"agents do not poll on schedule: {next_polls}"
        time.sleep(1)
    run = fleet.run_now("uname -n", agents)
    created = time.time()
    time.sleep(1.0)
    early = {a.name: a.agent_status() for a in agents}
    early_run = fleet.ns_api("GET", f"/api/runs/{run['id']}")
    return {
        "agents": agents, "settings": settings, "next_polls": next_polls, "run": run,
        "created": created, "early": early, "early_run": early_run,
    }  # fmt: skip


def test_task_is_not_there_before_the_first_poll(blocked_run: dict[str, Any]) -> None:
    by_computer = {e["computer"]: e for e in blocked_run["early_run"]["executions"]}
    for agent in blocked_run["agents"]:
        if blocked_run["next_polls"][agent.name] <= time.time() - 10:
            continue  # (only when the check itself ran late)
        status = blocked_run["early"][agent.name]
        last_pull = status["last_pull_at"] or 0
        assert last_pull < blocked_run["created"], f"{agent} pulled before its poll: {status}"
        assert by_computer[agent.computer_name]["status"] not in {"running", "succeeded"}


def test_task_arrives_with_the_poll(fleet: Fleet, blocked_run: dict[str, Any]) -> None:
    settings = blocked_run["settings"]
    wait = settings["task_request_interval_s"] * (1 + settings["poll_jitter_fraction"]) + 15
    done = fleet.wait_run(blocked_run["run"]["id"], timeout_s=wait)
    for summary in done["executions"]:
        execution = fleet.execution(summary["id"])
        who = execution["computer"]
        agent = next(a for a in blocked_run["agents"] if a.computer_name == who)
        assert execution["status"] == "succeeded", f"{who}: {execution}"
        assert execution["via"] == "poll", f"{who} got its work by {execution['via']}"
        pulled = steps(execution)["agent_pulled"]
        assert pulled is not None, f"{who} never pulled"
        assert pulled >= blocked_run["next_polls"][agent.name] - 1.0, (
            f"{who} pulled at {pulled}, before its poll at {blocked_run['next_polls'][agent.name]}"
        )


def test_ns_shows_blocked_agents_tickle_unreachable(
    fleet: Fleet, blocked_run: dict[str, Any]
) -> None:
    # The task server gives up after its last resend (about 15 s with the default backoff).
    names = {a.computer_name for a in blocked_run["agents"]}
    deadline = time.monotonic() + 60
    while True:
        states = {n: c["tickle_state"] for n, c in fleet.computers().items() if n in names}
        if all(s == "unreachable" for s in states.values()):
            return
        assert time.monotonic() < deadline, f"not shown tickle-unreachable: {states}"
        time.sleep(1)
