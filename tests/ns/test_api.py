"""The NS HTTP API: credentials, validation, runs, the pull, status events and the timeline."""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

import tickle
from tests.ns.conftest import ADMIN, SECRET, Ns, NsFactory, commits_of, event
from tests.reliability import record
from tickle.ns.models import StatusEvent as StatusEventRow
from tickle.ns.stores.inventory import InventoryStore

TIMELINE = [
    "created",
    "tickle_sent",
    "ts_pulled",
    "agent_tickled",
    "agent_pulled",
    "started",
    "finished",
    "cached_at_ts",
    "recorded",
]


async def test_health_and_metrics_need_no_credentials(ns: Ns) -> None:
    assert await ns.ok("GET", "/health", token=None) == {
        "status": "ok",
        "component": "ns",
        "version": tickle.__version__,  # the rolling upgrade waits for the new one
    }
    status, text = await ns.call("GET", "/metrics", token=None)
    assert status == 200
    assert "tickle_tickles_sent_total" in text


async def test_metrics_named_in_a_scrape_are_the_only_ones_read(
    ns: Ns, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prometheus's `name[]`: a scrape of one counter does not make the NS count its computers
    counted: list[str] = []
    for name in ("liveness_counts", "clock_figures"):
        read = getattr(InventoryStore, name)
        monkeypatch.setattr(
            InventoryStore,
            name,
            lambda self, *a, _r=read, _n=name: counted.append(_n) or _r(self, *a),
        )

    async def families(query: str) -> set[str]:
        status, text = await ns.call("GET", "/metrics" + query, token=None)
        assert status == 200
        return {f.name for f in text_string_to_metric_families(text) if f.samples}

    assert await families("?name[]=tickle_tickles_sent_total") == {"tickle_tickles_sent"}
    assert counted == []
    assert await families("?name[]=tickle_computers&name[]=tickle_computers_clock_skewed") == {
        "tickle_computers",
        "tickle_computers_clock_skewed",
    }
    assert sorted(counted) == ["clock_figures", "liveness_counts"]
    counted.clear()
    every = await families("")
    assert {"tickle_tickles_sent", "tickle_computers", "tickle_computers_clock_skewed"} <= every
    assert sorted(counted) == ["clock_figures", "liveness_counts"]
    assert await families("?name[]=no_such_metric") == set()


async def test_unauthenticated_requests_get_401(ns: Ns) -> None:
    for method, path in [("GET", "/api/tasks"), ("GET", "/api/ts/work"), ("GET", "/api/settings")]:
        assert (await ns.call(method, path, token=None))[0] == 401
        assert (await ns.call(method, path, token="not-a-token"))[0] == 401


async def test_task_server_token_on_admin_route_gets_403(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    status, body = await ts.call("GET", "/api/computers")
    assert status == 403, body
    assert (await ts.call("PUT", "/api/settings", json={"task_request_interval_s": 60}))[0] == 403


async def test_admin_token_on_task_server_route_gets_403(ns: Ns) -> None:
    assert (await ns.call("GET", "/api/ts/work"))[0] == 403


async def test_agent_token_on_the_ns_gets_403(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    agent = await ts.agent("pc1")
    assert (await ns.call("GET", "/api/ts/work", token=agent["token"]))[0] == 403
    assert (await ns.call("GET", "/api/tasks", token=agent["token"]))[0] == 403


async def test_wrong_enrollment_secret_gets_401(ns: Ns) -> None:
    body = {"enrollment_secret": "wrong", "name": "ts9", "tickle_host": "127.0.0.1",
            "api_url": "http://127.0.0.1:1"}  # fmt: skip
    status, _ = await ns.call("POST", "/api/ts/register", token=None, json=body)
    assert status == 401
    assert await ns.ok("GET", "/api/task-servers") == []


async def test_reregistering_a_task_server_rotates_its_credentials(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    old_token, old_key = ts.token, ts.key
    await ts.register()
    assert ts.token != old_token
    assert ts.key != old_key
    assert (await ns.call("GET", "/api/ts/clients", token=old_token))[0] == 401
    assert await ts.ok("GET", "/api/ts/clients") == []


async def test_reregistering_an_agent_moves_it_and_rotates_its_credentials(ns: Ns) -> None:
    ts1, ts2 = await ns.task_server("ts1"), await ns.task_server("ts2")
    first = await ts1.agent("pc1", groups=["lab"])
    second = await ts2.agent("pc1", groups=["lab"])
    assert second["token"] != first["token"]
    assert second["tickle_key"] != first["tickle_key"]
    assert await ts1.ok("GET", "/api/ts/clients") == []
    clients = await ts2.ok("GET", "/api/ts/clients")
    assert [c["name"] for c in clients] == ["pc1"]
    computers = await ns.ok("GET", "/api/computers")
    assert computers[0]["task_server"] == "ts2"


@pytest.mark.attacks
async def test_task_request_interval_outside_10_to_86400_s_is_refused_naming_it(ns: Ns) -> None:
    wanted = {-1: "refused", 0: "refused", 2: "refused", 9: "refused", 86401: "refused",
              10: 200, 86400: 200}  # fmt: skip
    tried = {}
    for interval in wanted:
        status, body = await ns.call(
            "PUT", "/api/settings", json={"task_request_interval_s": interval}
        )
        named = status == 422 and ["body", "task_request_interval_s"] in [
            e["loc"] for e in body["detail"]
        ]
        tried[interval] = "refused" if named else status
    record(
        case="Task Request Interval out of range",
        done="PUT /api/settings with intervals -1, 0, 2, 9, 86401 s (and 10, 86400 s)",
        outcome="out of range: 422 naming task_request_interval_s; 10 and 86400 s accepted"
        if tried == wanted
        else str(tried),
        tried=len(tried),
    )
    assert tried == wanted


async def test_bad_bodies_get_422_naming_the_field(ns: Ns) -> None:
    status, body = await ns.call(
        "POST", "/api/tasks", json={"name": "t", "command": ["true"], "timeout_s": -1}
    )
    assert status == 422
    assert ["body", "timeout_s"] in [e["loc"] for e in body["detail"]]
    status, body = await ns.call("PUT", "/api/settings", json={"task_request_interval_s": 1})
    assert status == 422
    assert ["body", "task_request_interval_s"] in [e["loc"] for e in body["detail"]]
    status, body = await ns.call("POST", "/api/tasks", json={"name": "t", "comand": ["true"]})
    assert status == 422
    assert ["body", "comand"] in [e["loc"] for e in body["detail"]]
    status, body = await ns.call("POST", "/api/runs", json={"computers": ["pc1"]})
    assert status == 422
    assert "task_id" in str(body["detail"])
    ts = await ns.task_server("ts1")
    status, body = await ts.call("POST", "/api/ts/events", json={"events": [{"event_id": "x"}]})
    assert status == 422
    assert "execution_id" in str(body["detail"])


async def test_run_with_an_unknown_computer_gets_404_naming_it(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    task = await ns.ok("POST", "/api/tasks", json={"name": "t", "command": ["true"]})
    status, body = await ns.call(
        "POST", "/api/runs", json={"task_id": task["id"], "computers": ["pc1", "ghost"]}
    )
    assert status == 404
    assert "ghost" in body["detail"]
    assert "pc1" not in body["detail"]
    status, body = await ns.call("POST", "/api/runs", json={"task_id": 999, "computers": ["pc1"]})
    assert status == 404
    assert "999" in body["detail"]


async def test_a_run_now_writes_its_run_and_its_audit_row_in_one_commit(ns: Ns) -> None:
    # one transaction: one commit less per run, and the pull of the task server tickled for the
    # run does not wait behind a second write
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    task = await ns.ok("POST", "/api/tasks", json={"name": "t", "command": ["true"]})
    with commits_of(ns.stores.database.engine) as commits:
        run = await ns.ok("POST", "/api/runs", json={"task_id": task["id"], "computers": ["pc1"]})
    with_run = [c for c in commits if any(s.startswith("INSERT INTO runs") for s in c)]
    assert len(with_run) == 1
    assert any(s.startswith("INSERT INTO audit_events") for s in with_run[0])
    newest = (await ns.ok("GET", "/api/audit"))[0]
    assert (newest["action"], newest["target"]) == ("run", f"run {run['id']}: task {task['id']}")
    assert newest["detail"]["executions"] == 1


async def test_run_for_a_group_selects_the_computers_in_it(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1", groups=["lab", "linux"])
    await ts.agent("pc2", groups=["office"])
    await ts.agent("pc3", groups=["lab"])
    task = await ns.ok("POST", "/api/tasks", json={"name": "t", "command": ["true"]})
    run = await ns.ok("POST", "/api/runs", json={"task_id": task["id"], "groups": ["lab"]})
    assert sorted(e["computer"] for e in run["executions"]) == ["pc1", "pc3"]
    status, body = await ns.call("POST", "/api/runs", json={"task_id": task["id"], "groups": ["x"]})
    assert status == 404
    assert "x" in body["detail"]


async def test_job_runs_its_tasks_in_order(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    a = await ns.ok("POST", "/api/tasks", json={"name": "a", "command": ["true"]})
    b = await ns.ok("POST", "/api/tasks", json={"name": "b", "script": "echo b"})
    job = await ns.ok("POST", "/api/jobs", json={"name": "j", "task_ids": [b["id"], a["id"]]})
    assert (await ns.ok("GET", "/api/jobs"))[0]["task_ids"] == [b["id"], a["id"]]
    status, body = await ns.call("POST", "/api/jobs", json={"name": "k", "task_ids": [77]})
    assert status == 404
    assert "77" in body["detail"]
    await ns.ok("POST", "/api/runs", json={"job_id": job["id"], "computers": ["pc1"]})
    work = await ts.ok("GET", "/api/ts/work")
    assert work["executions"][0]["kind"] == "job"
    assert [s["name"] for s in work["executions"][0]["steps"]] == ["b", "a"]


async def test_duplicate_task_name_gets_409(ns: Ns) -> None:
    await ns.ok("POST", "/api/tasks", json={"name": "t", "command": ["true"]})
    status, _ = await ns.call("POST", "/api/tasks", json={"name": "t", "command": ["false"]})
    assert status == 409


async def test_duplicate_status_event_is_recorded_once(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    run = await ns.run_task(["pc1"])
    ex_id = run["executions"][0]["id"]
    started = event(ex_id, "pc1", "started", time.time())
    first = await ts.ok("POST", "/api/ts/events", json={"events": [started, started]})
    again = await ts.ok("POST", "/api/ts/events", json={"events": [started]})
    assert first["accepted"] == [started["event_id"]] * 2
    assert again["accepted"] == [started["event_id"]]
    with ns.stores.database.reading() as s:
        count = s.scalar(select(func.count()).select_from(StatusEventRow))
    assert count == 1
    metrics = ns.metrics.status_events.labels(kind="started")._value.get()
    assert metrics == 1


async def test_events_fill_the_timeline_in_order(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    run = await ns.run_task(["pc1"])
    ex_id = run["executions"][0]["id"]
    await ts.tickle(within=2.0)
    await ts.ok("GET", "/api/ts/work")
    t = time.time()
    events = [
        event(ex_id, "pc1", "agent_tickled", t + 0.001),
        event(ex_id, "pc1", "agent_pulled", t + 0.002, via="tickle"),
        event(ex_id, "pc1", "started", t + 0.003),
        event(ex_id, "pc1", "finished", t + 0.004, status="succeeded", exit_code=0,
              output_tail="hi\n", cached_at=t + 0.005),
    ]  # fmt: skip
    await asyncio.sleep(0.01)  # the NS records after the task server cached
    # delivered out of order on purpose: the NS orders by step, not by arrival
    ack = await ts.ok("POST", "/api/ts/events", json={"events": events[::-1]})
    assert sorted(ack["accepted"]) == sorted(e["event_id"] for e in events)

    execution = await ns.ok("GET", f"/api/executions/{ex_id}")
    assert [step["step"] for step in execution["timeline"]] == TIMELINE
    times = [step["at"] for step in execution["timeline"]]
    assert all(at is not None for at in times), execution["timeline"]
    assert times == sorted(times), execution["timeline"]
    assert execution["status"] == "succeeded"
    assert execution["via"] == "tickle"
    assert execution["exit_code"] == 0
    assert execution["output_tail"] == "hi\n"
    progress = await ns.ok("GET", f"/api/runs/{run['id']}")
    assert progress["executions"][0]["status"] == "succeeded"
    assert ns.metrics.run_now_to_recorded._sum.get() > 0
    # a finished execution is no longer work
    assert (await ts.ok("GET", "/api/ts/work"))["executions"] == []


async def test_step_results_of_a_job_are_recorded(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    a = await ns.ok("POST", "/api/tasks", json={"name": "a", "command": ["true"]})
    b = await ns.ok("POST", "/api/tasks", json={"name": "b", "command": ["false"]})
    job = await ns.ok("POST", "/api/jobs", json={"name": "j", "task_ids": [a["id"], b["id"]]})
    run = await ns.ok("POST", "/api/runs", json={"job_id": job["id"], "computers": ["pc1"]})
    ex_id = run["executions"][0]["id"]
    t = time.time()
    await ts.ok("POST", "/api/ts/events", json={"events": [
        event(ex_id, "pc1", "step_finished", t, step=0, exit_code=0, status="succeeded"),
        event(ex_id, "pc1", "step_finished", t, step=1, exit_code=1, status="failed"),
        event(ex_id, "pc1", "finished", t, status="failed", exit_code=1),
    ]})  # fmt: skip
    execution = await ns.ok("GET", f"/api/executions/{ex_id}")
    assert [(s["name"], s["status"]) for s in execution["steps"]] == [
        ("a", "succeeded"),
        ("b", "failed"),
    ]
    assert execution["status"] == "failed"


async def test_task_server_cannot_read_or_report_another_task_servers_clients(ns: Ns) -> None:
    ts1, ts2 = await ns.task_server("ts1"), await ns.task_server("ts2")
    await ts1.agent("pc1")
    await ts2.agent("pc2")
    run = await ns.run_task(["pc1"])
    ex_id = run["executions"][0]["id"]

    assert (await ts2.ok("GET", "/api/ts/work"))["executions"] == []
    assert [c["name"] for c in await ts2.ok("GET", "/api/ts/clients")] == ["pc2"]
    forged = event(ex_id, "pc1", "finished", time.time(), status="succeeded", exit_code=0)
    status, ack = await ts2.call("POST", "/api/ts/events", json={"events": [forged]})
    assert status == 200
    assert ack["accepted"] == []
    assert (await ns.ok("GET", f"/api/executions/{ex_id}"))["status"] == "pending"
    state = [{"name": "pc1", "tickle_state": "unreachable", "at": time.time()}]
    status, body = await ts2.call("POST", "/api/ts/computers/state", json=state)
    assert status == 403
    assert "pc1" in body["detail"]
    # the right task server can report it
    ack = await ts1.ok("POST", "/api/ts/events", json={"events": [forged]})
    assert ack["accepted"] == [forged["event_id"]]


async def test_events_a_task_server_pulled_are_recorded_after_the_computer_moved(ns: Ns) -> None:
    ts1, ts2, ts3 = [await ns.task_server(n) for n in ("ts1", "ts2", "ts3")]
    await ts1.agent("pc1")
    run = await ns.run_task(["pc1"])
    ex_id = run["executions"][0]["id"]
    pulled = await ts1.ok("GET", "/api/ts/work")
    assert [w["execution_id"] for w in pulled["executions"]] == [ex_id]
    await ts2.agent("pc1")  # pc1 fails over while ts1 holds its events

    # reads stay strict: ts1 no longer gets pc1's work, ts3 never did
    assert (await ts1.ok("GET", "/api/ts/work"))["executions"] == []
    t = time.time()
    started = event(ex_id, "pc1", "started", t)
    finished = event(ex_id, "pc1", "finished", t + 1, status="succeeded", exit_code=0)
    ack = await ts3.ok("POST", "/api/ts/events", json={"events": [finished]})
    assert ack["accepted"] == [], "a task server that never pulled it cannot report it"
    wrong_computer = event(ex_id, "pc2", "started", t)
    ack = await ts1.ok(
        "POST", "/api/ts/events", json={"events": [wrong_computer, started, finished]}
    )
    assert ack["accepted"] == [started["event_id"], finished["event_id"]]
    execution = await ns.ok("GET", f"/api/executions/{ex_id}")
    assert execution["status"] == "succeeded"
    assert execution["task_server"] == "ts2"


async def test_event_for_an_unknown_execution_is_accepted_and_ignored(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    ghost = event(424242, "pc1", "started", time.time())
    ack = await ts.ok("POST", "/api/ts/events", json={"events": [ghost]})
    assert ack["accepted"] == [ghost["event_id"]]
    with ns.stores.database.reading() as s:
        assert s.scalar(select(func.count()).select_from(StatusEventRow)) == 0


async def test_computer_state_reports_reachability_and_detects_nat(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1", reported_address="10.0.0.5", observed_address="10.0.0.5")
    await ts.agent("pc2", cem=True)
    computers = {c["name"]: c for c in await ns.ok("GET", "/api/computers")}
    assert computers["pc1"]["nat_detected"] is False
    assert computers["pc2"]["tickle_state"] == "cem"
    registered_at = computers["pc1"]["last_contact_at"]
    at = time.time() + 1
    await ts.ok("POST", "/api/ts/computers/state", json=[
        {"name": "pc1", "tickle_state": "unreachable", "observed_address": "192.0.2.7", "at": at},
    ])  # fmt: skip
    pc1 = {c["name"]: c for c in await ns.ok("GET", "/api/computers")}["pc1"]
    assert pc1["tickle_state"] == "unreachable"
    assert pc1["observed_address"] == "192.0.2.7"
    assert pc1["nat_detected"] is True
    # a tickle that got no answer is no contact: a dead agent must not look alive
    assert pc1["last_contact_at"] == registered_at
    ack = await ts.ok("POST", "/api/ts/computers/state", json=[
        {"name": "pc1", "at": at, "contact_at": at, "settings_version": 1},
    ])  # fmt: skip
    assert ack == {"updated": 1, "forgotten": []}
    pc1 = {c["name"]: c for c in await ns.ok("GET", "/api/computers")}["pc1"]
    assert (pc1["last_contact_at"], pc1["settings_version"]) == (at, 1)
    servers = await ns.ok("GET", "/api/task-servers")
    assert servers[0]["clients"] == 2


async def test_openapi_documents_every_route_with_tags(ns: Ns) -> None:
    spec = await ns.ok("GET", "/openapi.json", token=None)
    assert spec["info"]["title"] == "Tickle Notification Server"
    for path in ["/api/runs", "/api/ts/work", "/api/ts/events", "/api/settings"]:
        for operation in spec["paths"][path].values():
            assert operation["tags"]
            assert operation["summary"]


async def test_settings_are_read_by_admin_and_task_servers(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    expected = {
        "version": 1,
        "task_request_interval_s": 1800,
        "poll_jitter_fraction": 0.1,
        "ts_check_interval_s": 60,
        "long_poll": False,  # off by default: CEM agents poll, as in the original
        "long_poll_timeout_s": 55,
    }
    assert await ns.ok("GET", "/api/settings") == expected
    assert await ts.ok("GET", "/api/ts/settings") == expected


async def test_admin_token_and_secret_are_generated_into_the_state_dir(
    ns_factory: NsFactory,
) -> None:
    ns = await ns_factory(admin_token=None, enrollment_secret=None)
    token = (ns.settings.state_dir / "admin-token").read_text().strip()
    assert (ns.settings.state_dir / "enrollment-secret").stat().st_mode & 0o077 == 0
    assert (await ns.call("GET", "/api/tasks", token=token))[0] == 200
    assert (await ns.call("GET", "/api/tasks", token=ADMIN))[0] == 401
    assert SECRET  # the fixture's secret is not the generated one


async def test_cancel_ends_pending_work_lists_it_for_the_task_server_and_leaves_finished_alone(
    ns: Ns,
) -> None:
    await cancel_and_output_scenario(ns)


async def cancel_and_output_scenario(ns: Ns) -> None:
    """Cancel three executions in three states; a job step's output (also on PostgreSQL)."""
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    await ts.agent("pc2")
    await ts.agent("pc3")
    run = await ns.run_task(["pc1", "pc2", "pc3"])
    pending, pulled, done = (e["id"] for e in run["executions"])
    await ts.ok("GET", "/api/ts/work")
    t = time.time()
    await ts.ok("POST", "/api/ts/events", json={"events": [
        event(pulled, "pc2", "agent_pulled", t, via="tickle"),
        event(done, "pc3", "finished", t, status="succeeded", exit_code=0),
    ]})  # fmt: skip

    one = await ns.ok("POST", f"/api/runs/{run['id']}/cancel?execution_id={pending}")
    assert (one["cancelled"], one["stopping"], one["already_final"]) == ([pending], [], [])
    rest = await ns.ok("POST", f"/api/runs/{run['id']}/cancel")
    assert (rest["cancelled"], rest["stopping"], rest["already_final"]) == (
        [], [pulled], [pending, done],
    )  # fmt: skip
    work = await ts.ok("GET", "/api/ts/work")
    # the pending one is no longer work; the pulled one is, until its agent reports its end
    assert [w["execution_id"] for w in work["executions"]] == [pulled]
    assert work["cancel"] == [pending, pulled]
    assert (await ns.ok("GET", f"/api/executions/{pending}"))["status"] == "cancelled"
    stopping = await ns.ok("GET", f"/api/executions/{pulled}")
    assert (stopping["status"], stopping["cancel_requested_at"] is not None) == ("delivered", True)
    await ts.ok("POST", "/api/ts/events", json={"events": [
        event(pulled, "pc2", "finished", time.time(), status="cancelled"),
    ]})  # fmt: skip
    assert (await ns.ok("GET", f"/api/executions/{pulled}"))["status"] == "cancelled"
    assert ns.metrics.executions.labels(status="cancelled")._value.get() == 2
    # output, NUL included (PostgreSQL keeps none in text): kept, readable
    step = event(done, "pc3", "step_finished", time.time(), step=0, status="succeeded",
                 exit_code=0, stdout="a\x00b", stderr="e")  # fmt: skip
    await ts.ok("POST", "/api/ts/events", json={"events": [step]})
    [kept] = (await ns.ok("GET", f"/api/executions/{done}/output"))["steps"]
    assert (kept["stdout"], kept["stderr"]) == ("a\ufffdb", "e")


async def test_a_work_pull_is_one_commit_reading_no_table_whole(ns: Ns) -> None:
    # its cancels were a second transaction, and found by reading every pull ever noted (the
    # cost of each pull grew with the history of the fleet)
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    await ts.agent("pc2")
    run = await ns.run_task(["pc1", "pc2"])
    await ts.ok("GET", "/api/ts/work")
    stopping = run["executions"][0]["id"]
    await ns.ok("POST", f"/api/runs/{run['id']}/cancel?execution_id={stopping}")
    engine = ns.stores.database.engine
    with commits_of(engine) as commits:
        work = await ts.ok("GET", "/api/ts/work?via=check")
    assert work["cancel"] == [stopping]
    # (the tickle server's passes commit beside it)
    pulls = [c for c in commits if any("SET last_pull_at" in s for s in c)]
    assert len(pulls) == 1
    assert any("cancel_requested_at >=" in s for s in pulls[0])
    with engine.connect() as conn:
        plans = [
            (statement, detail)
            for statement in pulls[0]
            if statement.startswith(("SELECT", "UPDATE"))
            for *_, detail in conn.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {statement}", (None,) * statement.count("?")
            )
        ]
    assert plans
    assert [(s, d) for s, d in plans if d.startswith("SCAN")] == []


async def test_a_work_pull_reads_a_computer_s_unfinished_executions_not_its_history(
    ns: Ns,
) -> None:
    # `status NOT IN (final)` found them through the computer's index alone: every execution
    # the computer ever had was read and dropped (a pull cost more with every run)
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    done = await ns.run_task(["pc1"])
    await ts.ok("GET", "/api/ts/work")
    finished = event(done["executions"][0]["id"], "pc1", "finished", time.time(),
                     status="succeeded", exit_code=0)  # fmt: skip
    await ts.ok("POST", "/api/ts/events", json={"events": [finished]})
    run = await ns.run_task(["pc1"], name="again")
    engine = ns.stores.database.engine
    with commits_of(engine) as commits:
        work = await ts.ok("GET", "/api/ts/work?via=check")
    assert [e["execution_id"] for e in work["executions"]] == [run["executions"][0]["id"]]
    pulls = [c for c in commits if any("SET last_pull_at" in s for s in c)]
    assert len(pulls) == 1
    reads = [s for s in pulls[0] if s.startswith("SELECT") and "JOIN computers" in s]
    assert len(reads) == 1
    with engine.connect() as conn:
        plan = [
            detail
            for *_, detail in conn.exec_driver_sql(
                f"EXPLAIN QUERY PLAN {reads[0]}", (None,) * reads[0].count("?")
            )
        ]
    assert any(d.startswith("SEARCH executions") and "computer_id=? AND status=?" in d
               for d in plan), plan  # fmt: skip


async def test_a_batch_of_events_is_recorded_by_one_insert_that_skips_those_recorded(
    ns: Ns,
) -> None:
    # a SELECT of the batch's event ids came first: one more statement per post
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    run = await ns.run_task(["pc1"])
    ex_id = run["executions"][0]["id"]
    await ts.ok("GET", "/api/ts/work")
    pulled = event(ex_id, "pc1", "agent_pulled", time.time(), via="tickle")
    started = event(ex_id, "pc1", "started", time.time())
    await ts.ok("POST", "/api/ts/events", json={"events": [pulled]})
    with commits_of(ns.stores.database.engine) as commits:
        ack = await ts.ok("POST", "/api/ts/events", json={"events": [pulled, started]})
    assert sorted(ack["accepted"]) == sorted([pulled["event_id"], started["event_id"]])
    (post,) = [c for c in commits if any("status_events" in s for s in c)]
    assert [s.split(" (")[0] for s in post if "status_events" in s] == ["INSERT INTO status_events"]
    with ns.stores.database.reading() as s:
        kinds = s.scalars(select(StatusEventRow.kind).order_by(StatusEventRow.id)).all()
    assert kinds == ["agent_pulled", "started"]


async def test_cancel_and_output_of_what_does_not_exist_are_404_naming_it(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    run = await ns.run_task(["pc1"])
    ex_id = run["executions"][0]["id"]
    status, body = await ns.call("POST", "/api/runs/999/cancel")
    assert (status, body["detail"]) == (404, "run 999 does not exist")
    status, body = await ns.call("POST", f"/api/runs/{run['id']}/cancel?execution_id=999")
    assert (status, body["detail"]) == (404, f"execution 999 is not one of run {run['id']}")
    status, body = await ns.call("GET", "/api/executions/999/output")
    assert (status, body["detail"]) == (404, "execution 999 does not exist")
    status, body = await ns.call("GET", f"/api/executions/{ex_id}/output?step=1")
    assert (status, body["detail"]) == (404, f"execution {ex_id} has no step 1")
    assert await ns.ok("GET", f"/api/executions/{ex_id}/output") == {
        "execution_id": ex_id, "steps": [],
    }  # fmt: skip


async def test_a_step_s_output_is_kept_once_outside_the_event_body(ns: Ns) -> None:
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    run = await ns.run_task(["pc1"])
    ex_id = run["executions"][0]["id"]
    await ts.ok("GET", "/api/ts/work")
    finished = event(ex_id, "pc1", "finished", time.time(), status="succeeded", exit_code=0,
                     step=0, stdout="out\n", stderr="err\n", step_started_at=time.time() - 1)  # fmt: skip
    await ts.ok("POST", "/api/ts/events", json={"events": [finished]})
    output = await ns.ok("GET", f"/api/executions/{ex_id}/output")
    assert output["steps"] == [{"step": 0, "name": output["steps"][0]["name"], "stdout": "out\n",
                                "stderr": "err\n"}]  # fmt: skip
    with ns.stores.database.reading() as s:
        body = s.scalar(select(StatusEventRow.body))
    assert body is not None
    assert "stdout" not in body
    assert "stderr" not in body
    execution = await ns.ok("GET", f"/api/executions/{ex_id}")
    assert [(r["step"], r["status"], r["exit_code"]) for r in execution["steps"]] == [
        (0, "succeeded", 0)
    ]
