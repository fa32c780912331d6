"""Headline of the tickle_delivery scenario: with the Task Request Interval long (30 minutes in
the scenario), a run-now reaches every tickle-reachable agent within seconds, by tickle, and every
step of the nine-step path is recorded at the NS.

Never skipped: a fleet that does not meet the preconditions fails here, saying which. Run by the
scenario's verify step (molecule.yml: additional_files_or_dirs) and by `make verify HEADLINES=...`.
"""

from __future__ import annotations

from typing import Any

import pytest

from fleet import Fleet, FleetHost, steps

# Seconds a run-now may take from the NS to the result recorded at the NS.
DELIVERY_S = 10.0
# Shortest Task Request Interval at which a pull within DELIVERY_S cannot pass for a poll.
MIN_INTERVAL_S = 300


@pytest.fixture(scope="module")
def reachable(fleet: Fleet) -> list[FleetHost]:
    agents = fleet.tickle_reachable_agents
    assert agents, (
        f"precondition: no tickle-reachable agent (not CEM, tickles not blocked) among {fleet.agents}"
    )
    interval = fleet.settings()["task_request_interval_s"]
    assert interval >= MIN_INTERVAL_S, (
        f"precondition: the Task Request Interval is {interval} s; at least {MIN_INTERVAL_S} s is "
        "needed for a delivery within seconds to prove a tickle rather than a poll"
    )
    return agents


@pytest.fixture(scope="module")
def delivered(fleet: Fleet, reachable: list[FleetHost]) -> dict[str, dict[str, Any]]:
    """Run `uname -n` now on every reachable agent; each execution by computer name."""
    run = fleet.run_now("uname -n", reachable)
    done = fleet.wait_run(run["id"], timeout_s=DELIVERY_S + 5)
    executions = {e["computer"]: fleet.execution(e["id"]) for e in done["executions"]}
    wanted = {a.computer_name for a in reachable}
    assert set(executions) == wanted, f"the run targets {sorted(executions)}, not {sorted(wanted)}"
    return executions


def test_every_agent_succeeds_by_tickle(delivered: dict[str, dict[str, Any]]) -> None:
    for who, execution in delivered.items():
        assert execution["status"] == "succeeded", f"{who}: {execution}"
        # The interval is long: only a tickle explains the pull.
        assert execution["via"] == "tickle", f"{who} got its work by {execution['via']}"
        assert who in (execution["output_tail"] or ""), (
            f"{who}: output {execution['output_tail']!r}"
        )


def test_every_step_is_recorded_within_seconds(delivered: dict[str, dict[str, Any]]) -> None:
    for who, execution in delivered.items():
        at = steps(execution)
        assert at, f"{who}: no timeline"
        missing = [step for step, t in at.items() if t is None]
        assert not missing, f"{who}: steps not recorded: {missing}"
        took = at["recorded"] - at["created"]
        assert took < DELIVERY_S, f"{who}: run-now to recorded took {took:.1f} s"


def test_ns_shows_the_agents_tickle_reachable(
    fleet: Fleet, delivered: dict[str, dict[str, Any]]
) -> None:
    computers = fleet.computers()
    states = {who: computers[who]["tickle_state"] for who in delivered}
    assert all(s == "reachable" for s in states.values()), states
