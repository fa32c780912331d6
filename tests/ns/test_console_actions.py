"""The console's operator's-day pages and actions over real HTTP on a real NS: runs filtered and
paged from the history, cancel and rerun (also of an ad-hoc command, also through the API), an
execution's per-step output with its cut marker, the fleet's liveness, versions, clocks and
pending registrations, forget, deletes, run now with an expiry and on all, and the settings'
reach — each action in the audit, under the same name whichever face did it."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

import tickle
from tests.ns.conftest import ADMIN, FakeTaskServer, Ns, NsFactory, event
from tests.ns.test_console_access import Browser, audit, csrf_in


@pytest.fixture
async def admin(ns: Ns) -> Browser:
    browser = Browser(ns, {})
    status, _, _ = await browser.login(ADMIN)
    assert status == 303
    return browser


async def act(browser: Browser, path: str, page: str, **form: str) -> tuple[int, str, Any]:
    """Post a console form with the CSRF token of `page` (as the browser would)."""
    status, body, _ = await browser.request("GET", page)
    assert status == 200, (page, status)
    return await browser.request("POST", path, {"csrf": csrf_in(body), **form})


async def fleet_of(ns: Ns, *names: str) -> FakeTaskServer:
    ts = await ns.task_server()
    for name in names:
        await ts.agent(name)
    return ts


def actions_of(events: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["who"], e["action"], e["target"]) for e in events]


async def test_runs_are_filtered_and_paged_from_the_history(admin: Browser, ns: Ns) -> None:
    ts = await fleet_of(ns, "pc1", "pc2")
    first = await ns.run_task(["pc1"], "one")
    for _ in range(50):
        await ns.ok("POST", "/api/runs", json={"task_id": first["task_id"], "computers": ["pc2"]})
    ex = first["executions"][0]
    at = time.time()
    finished = event(ex["id"], "pc1", "finished", at, status="failed", exit_code=1)
    await ts.ok("POST", "/api/ts/events", json={"events": [finished]})

    status, page, _ = await admin.request("GET", "/console/runs")
    assert status == 200
    shown = re.findall(r'href="/console/runs/(\d+)"', page)
    assert len(shown) == 50  # one page
    assert f'/console/runs/{first["id"]}"' not in page
    older = re.search(r'id="older" href="\?([^"]+)"', page)
    assert older, "no link to the older runs"
    _, page, _ = await admin.request("GET", "/console/runs?" + older.group(1).replace("&amp;", "&"))
    assert re.findall(r'href="/console/runs/(\d+)"', page) == [str(first["id"])]

    _, page, _ = await admin.request("GET", "/console/runs?status=failed&computer=pc1")
    assert re.findall(r'href="/console/runs/(\d+)"', page) == [str(first["id"])]
    assert "1 failed" in page
    _, page, _ = await admin.request("GET", "/console/runs?status=failed&computer=pc2")
    assert "No run matches." in page
    _, page, _ = await admin.request("GET", "/console/runs?since=2999-01-01T00:00")
    assert "No run matches." in page
    # every status has its place in the legend
    for status_name in ("pending", "cancelled", "expired", "lost", "timed_out", "interrupted"):
        assert f'<span class="swatch {status_name}">' in page
    status, page, _ = await admin.request("GET", "/console/runs?since=yesterday")
    assert status == 400
    assert "since: &#39;yesterday&#39; is not a time" in page


async def test_cancel_and_rerun_the_failed_from_the_run_page_are_audited(
    admin: Browser, ns: Ns
) -> None:
    await fleet_of(ns, "pc1", "pc2")
    # an ad-hoc command from Run now: its task goes inline with the run, not among the tasks
    status, _, r = await act(admin, "/console/run-now", "/console/run-now", what="command",
                             command="sleep 60", computers="pc1, pc2")  # fmt: skip
    assert status == 303
    path = r.headers["Location"]
    run = await ns.ok("GET", "/api/runs/" + path.rsplit("/", 1)[1])
    assert await ns.ok("GET", "/api/tasks") == []

    status, _, r = await act(admin, f"{path}/cancel", path)
    assert (status, r.headers["Location"]) == (303, path)
    after = await ns.ok("GET", f"/api/runs/{run['id']}")
    assert {e["status"] for e in after["executions"]} == {"cancelled"}

    status, _, r = await act(admin, f"{path}/rerun", path, failed="1")
    assert status == 303
    again_id = int(r.headers["Location"].rsplit("/", 1)[1])
    again = await ns.ok("GET", f"/api/runs/{again_id}")
    assert sorted(e["computer"] for e in again["executions"]) == ["pc1", "pc2"]
    assert again["label"] == "adhoc"
    assert (again["task_id"], again["job_id"]) == (None, None)
    _, page, _ = await admin.request("GET", f"/console/runs/{again_id}")
    assert "command adhoc" in page

    # through the API: the same action, the same audit; nothing failed is a one-line 409
    task = await ns.ok("POST", "/api/tasks", json={"name": "t", "command": ["true"]})
    ok = await ns.ok("POST", "/api/runs", json={"task_id": task["id"], "computers": ["pc1"]})
    status, answer = await ns.call("POST", f"/api/runs/{ok['id']}/rerun?failed=true")
    assert (status, answer["detail"]) == (
        409, f"run {ok['id']} has no computer to run again (none failed)"
    )  # fmt: skip
    whole = await ns.ok("POST", f"/api/runs/{ok['id']}/rerun?expires_in_s=60")
    assert [e["computer"] for e in whole["executions"]] == ["pc1"]
    assert whole["task_id"] == task["id"]
    assert whole["expires_at"] == pytest.approx(time.time() + 60, abs=10)
    await ns.ok("POST", f"/api/runs/{whole['id']}/cancel")

    events = await audit(ns)
    assert actions_of(events)[:4] == [
        ("admin", "run.cancel", f"run {whole['id']}"),
        ("admin", "run.rerun", f"run {whole['id']}: task {task['id']} again (run {ok['id']})"),
        ("admin", "run", f"run {ok['id']}: task {task['id']}"),
        ("admin", "task.define", f"task {task['id']} t"),
    ]
    assert ("admin", "run.rerun", f"run {again_id}: command adhoc again (run {run['id']})") in (
        actions_of(events)
    )
    assert ("admin", "run.cancel", f"run {run['id']}") in actions_of(events)


async def test_an_execution_shows_each_steps_output_with_its_cut_marker_and_can_be_cancelled(
    admin: Browser, ns: Ns
) -> None:
    ts = await fleet_of(ns, "pc1")
    a = await ns.ok("POST", "/api/tasks", json={"name": "first", "command": ["true"]})
    b = await ns.ok("POST", "/api/tasks", json={"name": "second", "command": ["true"]})
    job = await ns.ok("POST", "/api/jobs", json={"name": "both", "task_ids": [a["id"], b["id"]]})
    run = await ns.ok("POST", "/api/runs", json={"job_id": job["id"], "computers": ["pc1"]})
    ex = run["executions"][0]
    marker = "\n[tickle] ... 5000 bytes cut here ...\n"
    step = event(ex["id"], "pc1", "step_finished", time.time(), step=0, exit_code=0,
                 stdout="head" + marker + "tail", stderr="a warning")  # fmt: skip
    await ts.ok("POST", "/api/ts/events", json={"events": [step]})

    path = f"/console/executions/{ex['id']}"
    status, page, _ = await admin.request("GET", path)
    assert status == 200
    assert 'id="output-step-0"' in page
    assert "Step 0 · first" in page
    assert "[tickle] ... 5000 bytes cut here ..." in page
    assert "a warning" in page
    assert 'id="cancel-execution"' in page

    status, _, r = await act(admin, f"/console/runs/{run['id']}/cancel", path,
                             execution_id=str(ex["id"]))  # fmt: skip
    assert (status, r.headers["Location"]) == (303, path)
    _, page, _ = await admin.request("GET", path)
    assert 'id="cancel-execution"' not in page
    assert "Cancel requested" in page
    last = (await audit(ns))[0]
    assert (last["action"], last["target"]) == (
        "run.cancel", f"run {run['id']} execution {ex['id']}"
    )  # fmt: skip


async def test_fleet_shows_liveness_versions_and_clocks_and_a_computer_its_history(
    admin: Browser, ns: Ns
) -> None:
    await fleet_of(ns, "pc1", "pc2")
    run = await ns.run_task(["pc1"])
    status, page, _ = await admin.request("GET", "/console/fleet")
    assert status == 200
    for column in ("Online", "CEM / NAT", "Settings", "Clock"):
        assert f'<th scope="col">{column}</th>' in page
    for state in ("online", "offline", "clock_skewed"):
        assert f'id="count-{state}"' in page
    assert "not reported" in page  # no agent has reported its settings version yet
    assert f"Tickle {tickle.__version__} ·" in page  # the footer's is the software's version

    _, page, _ = await admin.request("GET", "/console/computers/pc1")
    assert f'href="/console/executions/{run["executions"][0]["id"]}"' in page
    _, page, _ = await admin.request("GET", "/console/computers/pc2")
    assert "No execution yet." in page


async def test_forget_a_computer_delete_a_task_server_and_tasks_and_jobs_audited(
    admin: Browser, ns: Ns
) -> None:
    ts = await fleet_of(ns, "pc1")
    status, _, r = await act(admin, "/console/computers/pc1/forget", "/console/computers/pc1")
    assert (status, r.headers["Location"]) == (303, "/console/fleet")
    assert await ns.ok("GET", "/api/computers") == []
    status, page, _ = await admin.request("GET", "/console/computers/pc1")
    assert status == 404  # forgotten, and no history to show

    status, _, r = await act(admin, f"/console/task-servers/{ts.name}/delete", "/console/fleet")
    assert (status, r.headers["Location"]) == (303, "/console/fleet")
    assert await ns.ok("GET", "/api/task-servers") == []

    task = await ns.ok("POST", "/api/tasks", json={"name": "t", "command": ["true"]})
    job = await ns.ok("POST", "/api/jobs", json={"name": "j", "task_ids": [task["id"]]})
    # a task a job uses is refused, with the reason on the page
    status, page, _ = await act(admin, f"/console/tasks/{task['id']}/delete", "/console/tasks")
    assert status == 400
    assert 'class="error" role="alert"' in page
    await act(admin, f"/console/jobs/{job['id']}/delete", "/console/tasks")
    status, _, _ = await act(admin, f"/console/tasks/{task['id']}/delete", "/console/tasks")
    assert status == 303
    assert await ns.ok("GET", "/api/tasks") == []

    assert actions_of(await audit(ns))[:4] == [
        ("admin", "task.delete", f"task {task['id']}"),
        ("admin", "job.delete", f"job {job['id']}"),
        ("admin", "job.define", f"job {job['id']} j"),
        ("admin", "task.define", f"task {task['id']} t"),
    ]
    assert ("admin", "task_server.delete", "task server ts1") in actions_of(await audit(ns))
    assert ("admin", "computer.forget", "computer pc1") in actions_of(await audit(ns))


async def test_pending_registrations_are_approved_or_rejected_on_the_fleet_page(
    ns_factory: NsFactory,
) -> None:
    ns = await ns_factory(registration_approval="manual")
    for name in ("ts1", "ts2"):
        body = {"enrollment_secret": ns.settings.enrollment_secret, "name": name,
                "tickle_host": "127.0.0.1", "tickle_port": 50199, "api_url": "http://x"}  # fmt: skip
        assert (await ns.call("POST", "/api/ts/register", None, body))[0] == 403
    browser = Browser(ns, {})
    await browser.login(ADMIN)
    _, page, _ = await browser.request("GET", "/console/fleet")
    assert 'id="registrations"' in page
    status, _, _ = await act(browser, "/console/registrations/task_server/ts1/approve",
                             "/console/fleet")  # fmt: skip
    assert status == 303
    await act(browser, "/console/registrations/task_server/ts2/reject", "/console/fleet")
    states = {r["name"]: r["state"] for r in await ns.ok("GET", "/api/registrations")}
    assert states == {"ts1": "approved", "ts2": "rejected"}
    status, page, _ = await act(browser, "/console/registrations/task_server/ts9/approve",
                                "/console/fleet")  # fmt: skip
    assert status == 400
    assert "no registration of task server ts9 awaits a decision" in page
    assert actions_of(await audit(ns))[:2] == [
        ("admin", "task_server.reject", "task_server ts2"),
        ("admin", "task_server.approve", "task_server ts1"),
    ]


async def test_run_now_on_all_with_an_expiry_and_the_settings_reach(admin: Browser, ns: Ns) -> None:
    await fleet_of(ns, "pc1", "pc2", "pc3")
    task = await ns.ok("POST", "/api/tasks", json={"name": "t", "command": ["true"]})
    status, _, r = await act(admin, "/console/run-now", "/console/run-now", what="task",
                             task_id=str(task["id"]), all="1", expires_in_min="2")  # fmt: skip
    assert status == 303
    run = await ns.ok("GET", "/api/runs/" + r.headers["Location"].rsplit("/", 1)[1])
    assert sorted(e["computer"] for e in run["executions"]) == ["pc1", "pc2", "pc3"]
    assert run["expires_at"] - run["created_at"] == pytest.approx(120, abs=1)
    last = (await audit(ns))[0]
    assert last["detail"]["all"] is True
    assert last["detail"]["expires_in_s"] == 120
    status, page, _ = await act(admin, "/console/run-now", "/console/run-now", what="task",
                                task_id=str(task["id"]), all="1", expires_in_min="soon")  # fmt: skip
    assert status == 400
    assert "expiry: &#39;soon&#39; is not a number" in page

    _, page, _ = await admin.request("GET", "/console/settings")
    reach = await ns.ok("GET", "/api/settings/reach")
    assert f'<b id="reach-current">{reach["current"]}</b>' in page
    assert f'<b id="reach-pending">{reach["pending"]}</b>' in page
