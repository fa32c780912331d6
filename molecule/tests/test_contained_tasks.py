"""A task's whole process tree dies with it on a real agent under systemd: a child it starts in a
new session (`setsid sleep ... &`) is killed at the task's timeout, and when the task exits 0
leaving it running; the status is recorded either way and no such sleep survives on the agent.

The agent contains each step in a cgroup of its own when its unit's cgroup is delegated to it
(Delegate=yes, root); otherwise it is the subreaper of its tasks. Which one it uses is checked
against what the host offers.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from fleet import AGENT_UNIT, Fleet, FleetHost

# after the task: its kill grace (5 s by default), the output drain, the way back to the NS
SETTLE_S = 20.0


@pytest.fixture(scope="module")
def targets(fleet: Fleet) -> tuple[list[FleetHost], float]:
    """Agents that get a run-now within seconds (by tickle), or by a short poll; the wait."""
    if fleet.tickle_reachable_agents:
        return fleet.tickle_reachable_agents, 10.0
    settings = fleet.settings()
    interval = settings["task_request_interval_s"] * (1 + settings["poll_jitter_fraction"])
    if fleet.agents and interval <= 120:
        return fleet.agents, interval + 10.0
    pytest.skip("no agent gets work within two minutes in this fleet")


def run(fleet: Fleet, agents: list[FleetHost], script: str, timeout_s: float) -> dict[str, Any]:
    task = fleet.ns_api(
        "POST", "/api/tasks",
        {"name": f"contained-{secrets.token_hex(4)}", "command": ["/bin/sh", "-c", script],
         "timeout_s": timeout_s},
    )  # fmt: skip
    return dict(
        fleet.ns_api(
            "POST", "/api/runs",
            {"task_id": task["id"], "computers": [a.computer_name for a in agents], "groups": []},
        )
    )  # fmt: skip


def survivors(agent: FleetHost, marker: str) -> str:
    """The processes on the agent whose whole command line is `sleep <marker>`."""
    return str(agent.run(f"pgrep -a -f -x 'sleep {marker}'").stdout).strip()


def executions(fleet: Fleet, run_id: int, wait_s: float) -> dict[str, dict[str, Any]]:
    done = fleet.wait_run(run_id, timeout_s=wait_s)
    return {e["computer"]: fleet.execution(e["id"]) for e in done["executions"]}


# The three tasks below, started together by `started` so that a fleet whose agents get work only
# by polling waits for one poll, not three: name -> (script ({marker}: its child's sleep), timeout).
TASKS: dict[str, tuple[str, float]] = {
    # a child in a new session outlives nothing: the task is killed at its timeout
    "timeout": ("setsid sleep {marker} & echo started; exec sleep 3601", 3),
    # the task: it exits 0 at once, its child keeps the output open
    "exits": ("setsid sleep {marker} & echo x; exit 0", 60),
    "cgroup": ("grep '^0::' /proc/self/cgroup || echo no-cgroup-v2", 30),
}


@pytest.fixture(scope="module")
def started(fleet: Fleet, targets: tuple[list[FleetHost], float]) -> dict[str, tuple[int, str]]:
    """The runs of TASKS on the target agents, all created at once: name -> (run id, marker)."""
    agents, _ = targets
    runs = {}
    for name, (script, timeout_s) in TASKS.items():
        marker = f"3600.{secrets.randbelow(10**6)}"
        runs[name] = (run(fleet, agents, script.format(marker=marker), timeout_s)["id"], marker)
    return runs


def check_contained(
    fleet: Fleet,
    targets: tuple[list[FleetHost], float],
    started: dict[str, tuple[int, str]],
    name: str,
    status: str,
    output: list[str],
) -> None:
    """The run of TASKS[name] ends `status` on every agent, its output holding every one of
    `output`, and the child it left is gone."""
    agents, wait = targets
    run_id, marker = started[name]
    for who, execution in executions(fleet, run_id, wait + TASKS[name][1] + SETTLE_S).items():
        assert execution["status"] == status, f"{who}: {execution}"
        missing = [text for text in output if text not in (execution["output_tail"] or "")]
        assert not missing, f"{who}: {missing} not in the output of {execution}"
    for agent in agents:
        assert not survivors(agent, marker), f"{agent}: {survivors(agent, marker)} survived"


def test_a_child_in_a_new_session_dies_at_the_task_timeout(
    fleet: Fleet, targets: tuple[list[FleetHost], float], started: dict[str, tuple[int, str]]
) -> None:
    expected = ["started", "[tickle] timed out"]
    check_contained(fleet, targets, started, "timeout", "timed_out", expected)


def test_a_child_left_running_dies_when_the_task_exits(
    fleet: Fleet, targets: tuple[list[FleetHost], float], started: dict[str, tuple[int, str]]
) -> None:
    expected = ["x", "[tickle] killed 1 process the task left running"]
    check_contained(fleet, targets, started, "exits", "succeeded", expected)


def test_the_agent_contains_tasks_in_cgroups_where_its_unit_delegates_one(
    fleet: Fleet, targets: tuple[list[FleetHost], float], started: dict[str, tuple[int, str]]
) -> None:
    agents, wait = targets
    seen = executions(fleet, started["cgroup"][0], wait + SETTLE_S)
    for agent in agents:
        root = str(agent.hostvars.get("tickle_client_task_agent_user", "root")) == "root"
        delegated = agent.check(f"systemctl show -p Delegate --value {AGENT_UNIT}").strip()
        pid = agent.check(f"systemctl show -p MainPID --value {AGENT_UNIT}").strip()
        own = agent.check(f"grep '^0::' /proc/{pid}/cgroup || true").strip()
        unit_cgroup = own.removeprefix("0::").removesuffix("/agent")
        mount = agent.check("findmnt -n -t cgroup2 -o TARGET | head -n 1").strip()
        writable = bool(mount) and agent.run(f"test -w '{mount}{unit_cgroup}/cgroup.procs'").rc == 0
        tail = seen[agent.computer_name]["output_tail"] or ""
        path = agent.agent_status()["containment"]
        facts = f"Delegate={delegated}, cgroup {own!r} on {mount!r}, writable {writable}"
        if root and delegated == "yes" and unit_cgroup.endswith(AGENT_UNIT) and writable:
            assert path == "cgroup", f"{agent}: {path}; {facts}"
            assert f"{AGENT_UNIT}/task-" in tail, f"{agent}: the task ran in {tail!r}"
        else:  # no cgroup of its own to divide: not root, not delegated, no cgroup v2
            assert path == "subreaper", f"{agent}: {path}; {facts}"
            assert "/task-" not in tail, f"{agent}: {tail!r}"
