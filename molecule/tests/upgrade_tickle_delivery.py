"""The rolling upgrade of the tickle_delivery scenario: its converge deployed the previous release
(its own site.yml, roles and wheelhouse), its side effect (molecule/shared/upgrade.yml) ran
playbooks/upgrade.yml while files/upgrade_load.py created run-nows on every agent every few
seconds. Here: every execution of every run the load created is recorded exactly once and ran
exactly once, the load spanned the whole upgrade, every service runs the new version, and the
upgrade run again changes nothing.

Run by the scenario's verify step (molecule.yml: additional_files_or_dirs), after the headline.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fleet import FINAL, NS_CONFIG, TICKLE, TS_CONFIG, Fleet, FleetHost, Run, wait_for

SUMMARY = "/var/tmp/tickle-upgrade-load.json"
MARKER = "/var/lib/tickle/client-task-agent/upgrade-load-ran"
ROOT = Path(__file__).resolve().parent.parent.parent
WHEELHOUSE = ROOT / "build" / "wheelhouse.json"
PREVIOUS = ROOT / "scripts" / "testbed" / "previous-release"
# The status events the NS recorded for each execution of a task, by kind (its SQLite database).
_EVENTS = r"""
import json, sqlite3, sys
db = sqlite3.connect("file:/var/lib/tickle/notification-server/ns.db?mode=ro", uri=True)
rows = db.execute(
    "SELECT e.id, s.kind, count(s.id) FROM executions e JOIN runs r ON e.run_id = r.id"
    " LEFT JOIN status_events s ON s.execution_id = e.id WHERE r.task_id = ? GROUP BY e.id, s.kind",
    (int(sys.argv[1]),),
).fetchall()
print(json.dumps(rows))
"""
# Seconds for the last runs to finish once the upgrade is done (delivered by tickle within seconds).
SETTLE_S = 120


@pytest.fixture(scope="module")
def load(fleet: Fleet) -> dict[str, Any]:
    """What the load created (its summary), every run of its task, each once every execution is
    final (or the settle time is up)."""
    summary = json.loads(fleet.ns.check(f"cat {SUMMARY}"))
    assert summary["task_id"] is not None, f"the load defined no task: {summary}"

    def listed() -> list[int]:
        ids: list[int] = []
        before: int | None = None
        while True:
            query = f"/api/runs?task_id={summary['task_id']}&limit=200"
            page = fleet.ns_api("GET", query + (f"&before={before}" if before else ""))
            ids += [r["id"] for r in page["runs"]]
            before = page["next_before"]
            if before is None:
                return sorted(ids)

    def all_final() -> dict[int, dict[str, Any]] | None:
        runs = {i: fleet.ns_api("GET", f"/api/runs/{i}") for i in listed()}
        done = all(e["status"] in FINAL for r in runs.values() for e in r["executions"])
        return runs if done else None

    try:
        runs = wait_for(
            "every execution of the load final", all_final, timeout_s=SETTLE_S, every_s=3
        )
    except AssertionError:
        runs = {i: fleet.ns_api("GET", f"/api/runs/{i}") for i in listed()}  # checked below
    events: dict[int, dict[str, int]] = {}
    for execution_id, kind, count in json.loads(
        fleet.ns.check("python3 -c %s %s", _EVENTS, str(summary["task_id"]))
    ):
        events.setdefault(execution_id, {})[kind] = count
    return {"summary": summary, "runs": runs, "events": events}


def test_every_execution_of_the_load_is_recorded_exactly_once(
    fleet: Fleet, load: dict[str, Any]
) -> None:
    created = {r["id"] for r in load["summary"]["runs"]}
    runs: dict[int, dict[str, Any]] = load["runs"]
    agents = sorted(a.computer_name for a in fleet.agents)
    # a call the NS took but did not answer (restarting) made a run the load never heard of
    assert created <= set(runs), f"runs created but not listed: {sorted(created - set(runs))}"
    executions = [e for r in runs.values() for e in r["executions"]]
    per_target = Counter((e["run_id"], e["computer"]) for e in executions)
    duplicates = {k: n for k, n in per_target.items() if n > 1}
    missing = [(i, c) for i in runs for c in agents if (i, c) not in per_target]
    lost = [e for e in executions if e["status"] not in FINAL]
    not_succeeded = [e for e in executions if e["status"] in FINAL and e["status"] != "succeeded"]
    # every execution's status events, each kind recorded once: pulled, started and finished
    # always (tickled when it went by tickle, not when an agent found it at its start)
    events: dict[int, dict[str, int]] = load["events"]
    wanted = {"agent_pulled", "started", "finished"}
    wrong_events = {
        e["id"]: events.get(e["id"], {})
        for e in executions
        if set(events.get(e["id"], {}).values()) != {1}
        or not wanted <= set(events.get(e["id"], {}))
    }
    counts = (
        f"upgrade load: {len(runs)} runs ({len(created)} answered, "
        f"{load['summary']['refused']} calls refused while the NS restarted), "
        f"{len(executions)} executions on {len(agents)} agents, "
        f"statuses {dict(Counter(e['status'] for e in executions))}, "
        f"{sum(sum(k.values()) for k in events.values())} status events, "
        f"duplicates {len(duplicates) + len(wrong_events)}, lost {len(lost) + len(missing)}"
    )
    print(counts)
    (ROOT / "build" / "upgrade-load.txt").write_text(counts + "\n")  # the figures of the last run
    assert len(runs) >= 10, f"the load made only {len(runs)} runs: {load['summary']}"
    assert not duplicates, f"executions recorded more than once: {duplicates}"
    assert not missing, f"targets with no execution: {missing[:20]}"
    assert not lost, f"executions not final {SETTLE_S} s after the upgrade: {lost[:10]}"
    assert not wrong_events, f"status events not recorded exactly once: {wrong_events}"
    # the agents' stop grace lets a one-second task finish across a restart
    assert not not_succeeded, f"executions that did not succeed: {not_succeeded[:10]}"


def test_every_execution_of_the_load_ran_once_on_its_agent(
    fleet: Fleet, load: dict[str, Any]
) -> None:
    wanted = {
        a.computer_name: {
            e["id"] for r in load["runs"].values() for e in r["executions"]
            if e["computer"] == a.computer_name
        }
        for a in fleet.agents
    }  # fmt: skip
    for agent in fleet.agents:
        ran = Counter(int(x) for x in agent.check(f"cat {MARKER}").split())
        twice = {i: n for i, n in ran.items() if n > 1}
        assert not twice, f"{agent}: executions run more than once: {twice}"
        assert set(ran) == wanted[agent.computer_name], (
            f"{agent}: ran {sorted(set(ran) ^ wanted[agent.computer_name])[:20]} "
            "differently from what the NS recorded"
        )


def test_the_load_ran_through_the_whole_upgrade(fleet: Fleet, load: dict[str, Any]) -> None:
    """Runs were created before the NS restarted and after the last agent restarted."""
    created = sorted(r["created_at"] for r in load["summary"]["runs"])
    ns_started = fleet.ns_api("GET", "/api/about")["started_at"]
    last_agent = max(a.agent_status()["started_at"] for a in fleet.agents)
    assert created[0] < ns_started, "no run was created before the NS was upgraded"
    assert created[-1] > last_agent, "no run was created after the last agent was upgraded"


def _health(host: FleetHost, config: str) -> dict[str, Any]:
    return dict(host.local_api(config, "GET", "/health"))


def test_every_service_runs_the_new_version(fleet: Fleet) -> None:
    version = json.loads(WHEELHOUSE.read_text())["version"]
    assert _health(fleet.ns, NS_CONFIG)["version"] == version
    for ts in fleet.task_servers:
        assert _health(ts, TS_CONFIG)["version"] == version, ts
    for agent in fleet.agents:
        assert agent.agent_status()["version"] == version, agent
        assert agent.check(f"{TICKLE} --version").split() == ["tickle", version], agent
    previous = PREVIOUS.read_text().split("version=", 1)[1].split()[0]
    assert version != previous, f"the checkout's version is the previous release's ({previous})"


def test_a_downgrade_is_refused_before_anything_changes(fleet: Fleet) -> None:
    older = ROOT / "build" / "previous" / "tree" / "build" / "wheelhouse"
    run = Run(fleet, "upgrade.yml", "-e", json.dumps({"tickle_install_wheelhouse": str(older)}))
    assert run.rc != 0, run
    previous = json.loads(older.with_suffix(".json").read_text())["version"]
    assert f"newer than the {previous} to install" in run.out, run
    for host in fleet.hosts:
        assert run.recap(host)["changed"] == 0, f"{host} changed before the refusal\n{run}"


def test_upgrade_again_changes_nothing(fleet: Fleet) -> None:
    # the same roles in fewer batches: what is checked here is that nothing changes
    batches = {"tickle_upgrade_task_server_serial": 2, "tickle_upgrade_agent_serial": "100%"}
    run = Run(fleet, "upgrade.yml", "-e", json.dumps(batches))
    assert run.rc == 0, run
    for host in fleet.hosts:
        recap = run.recap(host)
        assert recap["failed"] == 0, f"{host}: {recap}\n{run}"
        assert recap["changed"] == 0, f"{host}: {recap}\n{run}"
