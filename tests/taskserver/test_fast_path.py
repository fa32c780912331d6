"""The agents' pulls, event posts and registrations, served without FastAPI's per-request work
when well-formed (tickle.taskserver.fast_path): every answer is the one the routes give, and
whatever the fast path does not serve reaches the routes."""

from __future__ import annotations

import json
import uuid
from typing import Any

from fastapi import HTTPException

from tests.taskserver.conftest import AGENT_SECRET, Agent, TaskServerHarness, work_for
from tickle.serving import FastLane
from tickle.taskserver.api import current_agent, get_enrollment

REGISTER = "/api/agent/register"


def _registration(name: str, secret: str = AGENT_SECRET, **extra: Any) -> dict[str, Any]:
    return {"enrollment_secret": secret, "name": name, "tickle_host": "127.0.0.1",
            "tickle_port": 50124, **extra}  # fmt: skip


def _event(computer: str, execution_id: int, kind: str = "started", **extra: Any) -> dict[str, Any]:
    return {"event_id": str(uuid.uuid4()), "execution_id": execution_id, "computer": computer,
            "kind": kind, "at": 1.0, **extra}  # fmt: skip


async def test_well_formed_pulls_event_posts_and_registrations_do_not_reach_the_routes(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    await h.cache_work(work_for(1, "pc1"))
    app = h.running.api
    assert app is not None
    assert FastLane.of(app) is not None  # served at the connection, past the middleware

    async def at_the_route() -> None:
        raise HTTPException(status_code=418, detail="served by the route")

    app.dependency_overrides[current_agent] = at_the_route
    pulls = [{}, {"via": "tickle"}, {"via": "poll", "settings_version": "0"},
             {"settings_version": str(2**31 - 1)}]  # fmt: skip
    for params in pulls:
        status, body = await h.call(agent, "GET", "/api/agent/tasks", params=params)
        assert status == 200, (params, body)
        assert [e["execution_id"] for e in body["executions"]] == [1]
    started = {"events": [_event("pc1", 1)]}
    status, body = await h.call(agent, "POST", "/api/agent/events", json=started)
    assert (status, body) == (200, {"accepted": [started["events"][0]["event_id"]]})
    # an unknown parameter, a charset in the content type: the route's to judge
    status, _ = await h.call(agent, "GET", "/api/agent/tasks", params={"via": "poll", "x": "1"})
    assert status == 418
    status, _ = await h.call(agent, "POST", "/api/agent/events", data=json.dumps(started),
                             headers={"Content-Type": "application/json; charset=utf-8"})  # fmt: skip
    assert status == 418

    # an agent's registration: served; a body that is no registration goes to the route
    app.dependency_overrides[get_enrollment] = at_the_route
    status, body = await h.call(None, "POST", REGISTER, json=_registration("pc9"))
    assert (status, body["name"], body["ts_name"]) == (200, "pc9", "ts1")
    for bad in ({"name": "pc9"}, _registration("pc 9"), _registration("pc9", port=1)):
        status, _ = await h.call(None, "POST", REGISTER, json=bad)
        assert status == 418, bad


async def _both_ways(
    h: TaskServerHarness, agent: Agent | None, method: str, path: str, params: dict[str, str],
    **kw: Any,
) -> tuple[tuple[int, Any], tuple[int, Any]]:  # fmt: skip
    """The answer of the fast path, then the route's (an unknown parameter passes it on)."""
    fast = await h.call(agent, method, path, params=params, **kw)
    route = await h.call(agent, method, path, params={**params, "passed_on": "1"}, **kw)
    return fast, route


async def test_the_fast_path_answers_as_the_routes_do(task_server: TaskServerHarness) -> None:
    h = task_server
    mine = await h.register_agent("pc1")
    await h.register_agent("pc2")
    await h.cache_work(work_for(1, "pc1"), work_for(2, "pc1"), work_for(3, "pc2"))
    h.ns.cancel = [2]
    await h.running.sync.work.run("check")
    fast, route = await _both_ways(h, mine, "GET", "/api/agent/tasks", {"via": "tickle"})
    assert fast[0] == 200
    assert fast == route
    assert ([e["execution_id"] for e in fast[1]["executions"]], fast[1]["cancel"]) == ([1], [2])

    posts: list[tuple[str, dict[str, Any]]] = [
        ("started", {"events": [_event("pc1", 1)]}),
        ("finished", {"events": [_event("pc1", 1, "finished", status="succeeded", exit_code=0)]}),
        ("another computer's execution", {"events": [_event("pc1", 3)]}),
        ("as another computer", {"events": [_event("pc2", 3)]}),
        ("a task server's kind", {"events": [_event("pc1", 1, "agent_pulled")]}),
        # Python's `re` (msgspec's) matches a name pattern's `$` before a final line end
        ("a name with a line end", {"events": [_event("pc1\n", 1)]}),
        # pydantic reads numbers from text and whole floats as integers; msgspec does not
        (
            "numbers as text, a whole float",
            {"events": [_event("pc1", 1, "step_finished", at="1.5", step=1.0)]},
        ),
    ]
    answers = []
    for what, batch in posts:
        fast, route = await _both_ways(h, mine, "POST", "/api/agent/events", {}, json=batch)
        assert fast == route, what
        answers.append(fast[0])
    assert answers == [200, 200, 403, 403, 422, 422, 200]
    assert await h.reported(5)
    assert len(h.ns.events_of("started")) == len(h.ns.events_of("finished")) == 1


async def test_registrations_are_answered_as_the_route_answers_them(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    fast, route = await _both_ways(h, None, "POST", REGISTER, {}, json=_registration("pc7"))
    assert fast[0] == route[0] == 200
    assert sorted(fast[1]) == sorted(route[1])
    assert (fast[1]["name"], fast[1]["policy"]) == (route[1]["name"], route[1]["policy"])
    assert fast[1]["token"] != route[1]["token"]  # each registration rotates the credentials
    # refused: a wrong secret (401), the NS's refusal passed on (409)
    wrong = _registration("pc8", secret="not-the-secret-at-all")
    fast, route = await _both_ways(h, None, "POST", REGISTER, {}, json=wrong)
    assert fast == route
    assert fast[0] == 401
    h.ns.refuse_registration = (409, "computer pc8 is registered to another agent")
    fast, route = await _both_ways(h, None, "POST", REGISTER, {}, json=_registration("pc8"))
    assert fast == route
    assert fast[0] == 409


async def test_requests_the_fast_path_does_not_serve_get_the_routes_answers(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    forged = Agent("pc1", "not-a-token", b"", agent.socket, agent.enrollment)
    tasks = "/api/agent/tasks"
    cases: list[tuple[Agent | None, str, str, dict[str, Any], int]] = [
        (None, "GET", tasks, {}, 401),
        (forged, "GET", tasks, {}, 401),
        (forged, "POST", "/api/agent/events", {"json": {"events": []}}, 401),
        (agent, "GET", tasks, {"params": {"via": "bogus"}}, 422),
        (agent, "GET", tasks, {"params": {"via": ""}}, 422),
        (agent, "GET", tasks, {"params": {"settings_version": "-1"}}, 422),
        (agent, "GET", tasks, {"params": {"settings_version": str(2**31)}}, 422),
        (agent, "GET", tasks, {"params": {"settings_version": "v2"}}, 422),
        (agent, "POST", "/api/agent/events", {"data": b"{not json"}, 422),
        (agent, "POST", "/api/agent/events", {"json": {"events": [{"kind": "started"}]}}, 422),
        (agent, "POST", "/api/agent/events", {"json": {"events": []}, "params": {"settings_version": "x"}}, 422),
    ]  # fmt: skip
    for who, method, path, kw, expected in cases:
        status, body = await h.call(who, method, path, **kw)
        assert status == expected, (method, path, kw, body)
        if expected == 422:  # the route's validation error: it names what is wrong
            assert isinstance(body["detail"], list), body


async def test_a_pulls_policy_follows_the_settings_and_the_agents_reachability(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")

    async def policy() -> dict[str, Any]:
        fast, route = await _both_ways(h, agent, "GET", "/api/agent/tasks", {"via": "poll"})
        assert fast == route
        assert fast[0] == 200
        policy: dict[str, Any] = fast[1]["policy"]
        return policy

    first = await policy()
    assert (first["settings_version"], first["long_poll"]) == (1, False)
    h.ns.settings = h.ns.settings.model_copy(update={"version": 2, "long_poll": True})
    await h.running.sync.settings.run("check")
    assert ((await policy())["settings_version"], (await policy())["long_poll"]) == (2, False)
    h.running.store.set_unreachable("pc1", True)  # its tickles went unanswered
    assert (await policy())["long_poll"] is True
    h.running.store.set_unreachable("pc1", False)
    assert (await policy())["long_poll"] is False
