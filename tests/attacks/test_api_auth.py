"""No one is let in: every route refuses missing, wrong and misplaced credentials.

Routes are read from the live OpenAPI documents, so a route added later is covered without editing
this file; health and metrics are the only routes open to anyone. Then the ownership rules: an
agent never sees or reports another agent's executions, a task server never reports for another
task server's clients.
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pytest

from tests.attacks.conftest import Peers, call
from tests.integration.conftest import eventually
from tests.reliability import record

OPEN_ROUTES = {("GET", "/health"), ("GET", "/metrics")}


@dataclass
class Route:
    component: str  # "ns" or "ts"
    method: str
    path: str  # with path parameters filled in
    template: str
    secured: bool  # bearer token
    enrolls: bool  # enrollment secret in the body
    body: Any


def _resolve(schema: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = doc["components"]["schemas"][name]
    return schema


def sample(schema: dict[str, Any], doc: dict[str, Any], field: str = "") -> Any:
    """A small value valid for `schema` (required fields only); secrets are wrong ones."""
    schema = _resolve(schema, doc)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = [s for s in schema[key] if _resolve(s, doc).get("type") != "null"]
            return sample(options[0], doc, field)
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: sample(props[name], doc, name) for name in schema.get("required", [])}
    if kind == "array":
        return [sample(schema.get("items", {}), doc, field)] * schema.get("minItems", 0)
    if kind == "integer":
        return max(1, schema.get("minimum", 1))
    if kind == "number":
        return max(1.0, schema.get("minimum", 1.0))
    if kind == "boolean":
        return False
    if "enum" in schema:
        return schema["enum"][0]
    if field == "enrollment_secret":
        return "wrong-" + secrets.token_urlsafe(16)
    return "probe-x1"


async def routes(component: str, base_url: str) -> list[Route]:
    status, doc = await call("GET", base_url + "/openapi.json")
    assert status == 200
    found = []
    for template, item in doc["paths"].items():
        for method, op in item.items():
            body = None
            enrolls = False
            content = op.get("requestBody", {}).get("content", {}).get("application/json")
            if content is not None:
                schema = _resolve(content["schema"], doc)
                body = sample(schema, doc)
                enrolls = "enrollment_secret" in schema.get("properties", {})
            path = template
            for param in op.get("parameters", []):
                if param["in"] == "path":
                    path = path.replace("{" + param["name"] + "}", "1")
            found.append(
                Route(component, method.upper(), path, template, bool(op.get("security")),
                      enrolls, body)
            )  # fmt: skip
    return found


def credentials_for(route: Route, peers: Peers) -> dict[str, str | None]:
    """The credentials that must be refused on `route`: name -> bearer token (None: no header)."""
    wrong = {"none": None, "wrong": secrets.token_urlsafe(32), "empty": ""}
    if route.component == "ts":  # the agent API: only a registered agent's token
        return {**wrong, "admin": peers.fleet.admin_token, "task-server": peers.ts_token}
    if route.template.startswith("/api/ts/"):
        return {**wrong, "admin": peers.fleet.admin_token, "agent": peers.agent_a}
    return {**wrong, "task-server": peers.ts_token, "agent": peers.agent_a}


def expected_status(route: Route, who: str) -> int:
    if route.component == "ns" and who in ("admin", "task-server", "agent"):
        return 403  # a valid credential in the wrong place
    return 401


@pytest.mark.attacks
@pytest.mark.integration
@pytest.mark.timeout(120)
async def test_every_route_refuses_missing_wrong_and_misplaced_credentials(peers: Peers) -> None:
    all_routes = await routes("ns", peers.fleet.ns_url) + await routes("ts", peers.ts_url)
    open_routes = {(r.method, r.template) for r in all_routes if not r.secured and not r.enrolls}
    assert open_routes == OPEN_ROUTES, "a route is open to anyone"
    wrong_answers = []
    tried = 0
    for route in all_routes:
        base = peers.fleet.ns_url if route.component == "ns" else peers.ts_url
        if route.enrolls:  # the credential is the secret in the body: a wrong one
            status, detail = await call(route.method, base + route.path, None, route.body)
            tried += 1
            if status != 401:
                wrong_answers.append((route.component, route.method, route.path, "secret", status))
            continue
        if not route.secured:
            continue
        for who, token in credentials_for(route, peers).items():
            headers = {}
            if token == "":
                headers["Authorization"] = "Bearer "
                token = None
            status, detail = await call(route.method, base + route.path, token, route.body,
                                        **headers)  # fmt: skip
            tried += 1
            if status != expected_status(route, who):
                wrong_answers.append((route.component, route.method, route.path, who, status,
                                      str(detail)[:200]))  # fmt: skip
        status, _ = await call(route.method, base + route.path, None, route.body,
                               Authorization=f"Basic {secrets.token_urlsafe(12)}")  # fmt: skip
        tried += 1
        if status != 401:
            wrong_answers.append((route.component, route.method, route.path, "basic", status))
    record(
        case="Every route x wrong credentials",
        done=f"{len(all_routes)} routes from the OpenAPI documents x none/wrong/empty/Basic/"
        "misplaced tokens (admin, task server, agent), wrong enrollment secret",
        outcome="all refused (401/403), only health and metrics open"
        if not wrong_answers
        else f"{len(wrong_answers)} let in or wrong code",
        tried=tried,
        routes=len(all_routes),
        let_in=len(wrong_answers),
    )
    assert not wrong_answers, wrong_answers
    assert tried > 50


async def _run_on(peers: Peers, computer: str) -> int:
    admin = peers.fleet.admin_token
    status, task = await call("POST", peers.fleet.ns_url + "/api/tasks", admin,
                              {"name": f"own-{time.monotonic_ns()}", "command": ["true"]})  # fmt: skip
    assert status == 201, task
    status, run = await call("POST", peers.fleet.ns_url + "/api/runs", admin,
                             {"task_id": task["id"], "computers": [computer]})  # fmt: skip
    assert status == 201, run
    return int(run["executions"][0]["id"])


async def _pulled_ids(peers: Peers, token: str) -> set[int]:
    status, body = await call("GET", peers.ts_url + "/api/agent/tasks?via=check_now", token)
    assert status == 200, body
    return {w["execution_id"] for w in body["executions"]}


def _event(execution_id: int, computer: str, kind: str = "finished") -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()), "execution_id": execution_id, "computer": computer,
        "kind": kind, "at": time.time(), "status": "succeeded", "exit_code": 0,
    }  # fmt: skip


@pytest.mark.attacks
@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_an_agent_cannot_read_or_report_another_agents_executions(peers: Peers) -> None:
    mine = await _run_on(peers, peers.agent_a_name)

    async def cached_for_a() -> bool:
        return mine in await _pulled_ids(peers, peers.agent_a)

    await eventually(cached_for_a, 15, "the execution to reach probe-a's task server")
    seen_by_b = await _pulled_ids(peers, peers.agent_b)
    attempts = [
        # B reports for A's execution, naming A, then naming itself
        ("as-owner", _event(mine, peers.agent_a_name)),
        ("as-itself", _event(mine, peers.agent_b_name)),
    ]
    refused = []
    for label, event in attempts:
        status, _ = await call("POST", peers.ts_url + "/api/agent/events", peers.agent_b,
                               {"events": [event]})  # fmt: skip
        refused.append((label, status))
    # a task server that is not probe-a's reports A's execution finished at the NS
    status, ack = await call("POST", peers.fleet.ns_url + "/api/ts/events", peers.ts_token,
                             {"events": [_event(mine, peers.agent_a_name)]})  # fmt: skip
    _, foreign_work = await call("GET", peers.fleet.ns_url + "/api/ts/work", peers.ts_token)
    _, foreign_clients = await call("GET", peers.fleet.ns_url + "/api/ts/clients", peers.ts_token)
    _, execution = await call("GET", f"{peers.fleet.ns_url}/api/executions/{mine}",
                              peers.fleet.admin_token)  # fmt: skip
    checks = {
        "B never pulled A's execution": mine not in seen_by_b,
        "B's reports refused with 403": refused == [("as-owner", 403), ("as-itself", 403)],
        "foreign task server's report not accepted": status == 403
        or (status == 200 and ack["accepted"] == []),
        "foreign task server's pull lacks it": mine
        not in {w["execution_id"] for w in foreign_work["executions"]},
        "foreign task server's clients lack A": peers.agent_a_name
        not in {c["name"] for c in foreign_clients},
        "execution not finished": execution["status"] not in ("succeeded", "failed"),
    }
    failed = [name for name, ok in checks.items() if not ok]
    record(
        case="Another agent's / task server's executions",
        done="agent B pulls and reports for agent A's execution; a second task server reports "
        "it finished and pulls work and clients at the NS",
        outcome="refused, nothing leaked, execution unchanged" if not failed else "; ".join(failed),
        tried=len(attempts) + 3,
    )
    assert not failed, (failed, refused, status, ack, execution)
