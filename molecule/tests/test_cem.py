"""CEM mode: no tickle listener, no tickles sent by the task server (its counters), work arrives
by polling."""

from __future__ import annotations

import time

import pytest

from fleet import TS_CONFIG, Fleet, metric, steps

MAX_INTERVAL_S = 120


def test_cem_agents_get_work_by_polling_and_no_tickles(fleet: Fleet) -> None:
    agents = [a for a in fleet.agents if a.cem]
    if not agents:
        pytest.skip("no CEM agent in this fleet")
    settings = fleet.settings()
    interval = settings["task_request_interval_s"]
    if interval > MAX_INTERVAL_S:
        pytest.skip(f"Task Request Interval {interval} s: too long to wait for in a test")
    computers = fleet.computers()
    serving = {computers[a.computer_name]["task_server"] for a in agents}
    servers = [
        h
        for h in fleet.task_servers
        if str(h.hostvars.get("tickle_task_server_name", h.name)) in serving
    ]
    assert servers, f"no task server of the inventory serves the CEM agents ({serving})"

    def counters() -> dict[str, tuple[float, float, float]]:
        out = {}
        for ts in servers:
            text = ts.local_api(TS_CONFIG, "GET", "/metrics")
            out[ts.name] = (
                metric(text, "tickle_tickles_sent_total", kind="tasks"),
                metric(text, "tickle_tickles_resent_total", kind="tasks"),
                metric(text, "tickle_tickles_skipped_cem_total"),
            )
        return out

    before = counters()
    run = fleet.run_now("uname -n", agents)
    done = fleet.wait_run(
        run["id"], timeout_s=interval * (1 + settings["poll_jitter_fraction"]) + 15
    )
    time.sleep(1)
    after = counters()

    for summary in done["executions"]:
        execution = fleet.execution(summary["id"])
        who = execution["computer"]
        assert execution["status"] == "succeeded", f"{who}: {execution}"
        assert execution["via"] == "poll", f"{who} got its work by {execution['via']}"
        assert steps(execution)["agent_tickled"] is None, f"{who} was tickled"
    for ts in servers:
        sent_before, resent_before, skipped_before = before[ts.name]
        sent_after, resent_after, skipped_after = after[ts.name]
        assert sent_after == sent_before, f"{ts} sent tickles: {sent_before} -> {sent_after}"
        assert resent_after == resent_before, (
            f"{ts} resent tickles: {resent_before} -> {resent_after}"
        )
        assert skipped_after >= skipped_before
    for agent in agents:
        assert fleet.computers()[agent.computer_name]["tickle_state"] == "cem"
