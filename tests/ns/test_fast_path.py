"""A task server's work pulls, event posts and agent registrations, served without FastAPI's
per-request work when well-formed (tickle.ns.fast_path): every answer is the one the routes
give, and whatever the fast path does not serve reaches the routes."""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import HTTPException
from sqlalchemy import select

from tests.ns.conftest import FakeTaskServer, Ns
from tickle.ns.auth import require_task_server
from tickle.ns.models import StatusEvent
from tickle.serving import FastLane

REGISTER_AGENT = "/api/ts/agents/register"


def _event(computer: str, execution_id: int, kind: str = "agent_pulled") -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "execution_id": execution_id, "computer": computer,
            "kind": kind, "at": 1.0}  # fmt: skip


async def _raw(
    ts: FakeTaskServer, method: str, path: str, body: str | None = None, **headers: str
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ts.token}", "Content-Type": "application/json", **headers}
    async with ts.ns.http.request(method, ts.ns.url + path, data=body, headers=headers) as r:
        return r.status, await r.json()


async def _known(ns: Ns) -> tuple[FakeTaskServer, int]:
    """A task server this NS process has looked up (by a route), with one execution pending."""
    ts = await ns.task_server("ts1")
    await ts.agent("pc1")
    run = await ns.run_task(["pc1"])
    await ts.ok("GET", "/api/ts/clients")
    return ts, int(run["executions"][0]["id"])


async def test_well_formed_pulls_event_posts_and_registrations_do_not_reach_the_routes(
    ns: Ns,
) -> None:
    ts, execution = await _known(ns)

    async def at_the_route() -> None:
        raise HTTPException(status_code=418, detail="served by the route")

    ns.app.dependency_overrides[require_task_server] = at_the_route
    for query in ("", "?via=tickle", "?via=check", "?via=start"):
        status, body = await _raw(ts, "GET", "/api/ts/work" + query)
        assert status == 200, (query, body)
        assert [w["execution_id"] for w in body["executions"]] == [execution]
    batch = {"events": [_event("pc1", execution)]}
    status, body = await _raw(ts, "POST", "/api/ts/events", json.dumps(batch))
    assert (status, body) == (200, {"accepted": [batch["events"][0]["event_id"]]})
    # an unknown or a repeated parameter, a charset in the content type, a body that is no
    # batch: the route's to judge
    for query in ("?via=tickle&x=1", "?via=check&via=tickle", "?via=nonsense"):
        assert (await _raw(ts, "GET", "/api/ts/work" + query))[0] == 418, query
    charset = {"Content-Type": "application/json; charset=utf-8"}
    assert (await _raw(ts, "POST", "/api/ts/events", json.dumps(batch), **charset))[0] == 418
    assert (await _raw(ts, "POST", "/api/ts/events", '{"events": 1}'))[0] == 418
    # an agent's registration: served; a body that is no registration goes to the route
    registration = json.dumps({"name": "pc9", "tickle_host": "127.0.0.1", "tickle_port": 50124})
    status, body = await _raw(ts, "POST", REGISTER_AGENT, registration)
    assert (status, body["name"]) == (200, "pc9")
    assert sorted(body) == ["name", "tickle_key", "token"]
    for bad in ('{"name": "pc 9"}', '{"name": "pc9", "port": 1}', "[]"):
        assert (await _raw(ts, "POST", REGISTER_AGENT, bad))[0] == 418, bad
    assert (await _raw(ts, "POST", REGISTER_AGENT, registration, **charset))[0] == 418


async def test_the_fast_path_answers_as_the_routes_do(ns: Ns) -> None:
    assert FastLane.of(ns.app) is not None  # served at the connection, past the middleware
    ts, execution = await _known(ns)
    other = await ns.task_server("ts2")
    await other.agent("pc2")
    await other.ok("GET", "/api/ts/clients")
    elsewhere = (await ns.run_task(["pc2"], name="other"))["executions"][0]["id"]

    # an unknown parameter passes a request on to the route (which ignores it)
    await _raw(ts, "GET", "/api/ts/work?via=tickle")  # the first pull stamps the execution
    fast = await _raw(ts, "GET", "/api/ts/work?via=check")
    route = await _raw(ts, "GET", "/api/ts/work?via=check&passed_on=1")
    assert fast[0] == 200
    assert fast == route
    assert [w["execution_id"] for w in fast[1]["executions"]] == [execution]

    mine, theirs = _event("pc1", execution), _event("pc2", elsewhere)
    body = json.dumps({"events": [mine, theirs]})
    fast = await _raw(ts, "POST", "/api/ts/events", body)
    route = await _raw(ts, "POST", "/api/ts/events?passed_on=1", body)
    # recorded once; another task server's client's event is not accepted, either way
    assert fast == route == (200, {"accepted": [mine["event_id"]]})
    timeline = (await ns.ok("GET", f"/api/executions/{execution}"))["timeline"]
    assert {s["step"] for s in timeline if s["at"] is not None} >= {"agent_pulled"}

    # what the route and the fast path (msgspec) read apart goes to the route: the same answer
    posts: list[tuple[str, list[dict[str, Any]]]] = [
        # Python's `re` (msgspec's) matches a name pattern's `$` before a final line end
        ("a name with a line end", [_event("pc1\n", execution, "started")]),
        # pydantic reads numbers from text and whole floats as integers; msgspec does not
        ("numbers as text, a whole float",
         [_event("pc1", execution, "step_finished") | {"at": "1.5", "step": 1.0}]),
        ("an unknown field", [_event("pc1", execution) | {"colour": "red"}]),
        ("a kind no event has", [_event("pc1", execution, "exploded")]),
    ]  # fmt: skip
    answers = []
    for what, events in posts:
        fast = await _raw(ts, "POST", "/api/ts/events", json.dumps({"events": events}))
        again = [e | {"event_id": str(uuid.uuid4())} for e in events]  # each recorded once
        route = await _raw(ts, "POST", "/api/ts/events?passed_on=1", json.dumps({"events": again}))
        assert fast[0] == route[0], what
        answers.append(fast[0])
    assert answers == [422, 200, 422, 422]


async def test_an_event_read_by_the_fast_path_is_stored_as_the_route_stores_it(ns: Ns) -> None:
    ts, execution = await _known(ns)
    finished = _event("pc1", execution, "finished") | {
        "status": "failed", "exit_code": 3, "step": 0, "output_tail": "tail", "via": None,
        "stdout": "out", "stderr": "err", "cached_at": 2.5, "step_started_at": 1e999,
    }  # fmt: skip
    by_route = finished | {"event_id": str(uuid.uuid4())}
    assert (await _raw(ts, "POST", "/api/ts/events", json.dumps({"events": [finished]})))[0] == 200
    body = json.dumps({"events": [by_route]})
    assert (await _raw(ts, "POST", "/api/ts/events?passed_on=1", body))[0] == 200
    with ns.stores.database.reading() as s:
        rows = dict(s.execute(select(StatusEvent.event_id, StatusEvent.body)).all())
    fast, route = rows[finished["event_id"]], rows[by_route["event_id"]]
    assert fast | {"event_id": "x"} == route | {"event_id": "x"}
    assert "stdout" not in fast  # kept once, in its step's output
    assert fast["step_started_at"] is None  # infinite: no JSON number

    # registrations: credentials of the same shape; a refusal (another identity under a
    # registered name: 409) in the same words
    identity = json.dumps({"name": "pc7", "identity": "i" * 16})
    fast = await _raw(ts, "POST", REGISTER_AGENT, identity)
    route = await _raw(ts, "POST", REGISTER_AGENT + "?passed_on=1", identity)
    assert fast[0] == route[0] == 200
    assert fast[1]["name"] == route[1]["name"] == "pc7"
    assert fast[1]["token"] != route[1]["token"]  # each registration rotates the credentials
    stranger = json.dumps({"name": "pc7", "identity": "s" * 16})
    fast = await _raw(ts, "POST", REGISTER_AGENT, stranger)
    route = await _raw(ts, "POST", REGISTER_AGENT + "?passed_on=1", stranger)
    assert fast == route
    assert fast[0] == 409
    assert "registered to another agent" in fast[1]["detail"]


async def test_tokens_the_fast_path_does_not_know_get_the_routes_answers(ns: Ns) -> None:
    ts, _ = await _known(ns)
    stranger = FakeTaskServer(ns, "nobody", token="not-a-token")
    status, body = await _raw(stranger, "GET", "/api/ts/work")
    assert status == 401, body
    admin = FakeTaskServer(ns, "admin", token=ns.settings.admin_token or "")
    status, body = await _raw(admin, "POST", "/api/ts/events", json.dumps({"events": []}))
    assert status == 403, body
    assert (await _raw(ts, "POST", "/api/ts/events", json.dumps({"events": []})))[0] == 200
