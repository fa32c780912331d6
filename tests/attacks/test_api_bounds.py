"""Values past what the database holds are refused (422/404), never a 500 (found by schemathesis)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.attacks.conftest import Peers, call
from tests.reliability import record

HUGE = 2**63  # past SQLite's INTEGER; 2**31 is past PostgreSQL's


def _event(**fields: Any) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "execution_id": 1,
        "computer": "probe-a",
        "kind": "started",
        "at": 1.0,
        **fields,
    }


CASES = [
    ("ns", "admin", "POST", "/api/jobs", {"name": "j-huge", "task_ids": [HUGE]}),
    ("ns", "admin", "POST", "/api/jobs", {"name": "j-int32", "task_ids": [2**31]}),
    ("ns", "admin", "POST", "/api/runs", {"task_id": HUGE, "computers": ["probe-a"]}),
    ("ns", "admin", "GET", f"/api/runs/{HUGE}", None),
    ("ns", "admin", "GET", f"/api/executions/{HUGE}", None),
    ("ns", "ts", "POST", "/api/ts/events", {"events": [_event(execution_id=HUGE)]}),
    ("ns", "ts", "POST", "/api/ts/events", {"events": [_event(exit_code=HUGE)]}),
    ("ns", "ts", "POST", "/api/ts/events", {"events": [_event(step=HUGE)]}),
    ("ts", "agent", "POST", "/api/agent/events", {"events": [_event(execution_id=HUGE)]}),
]


def _record_refusals(case: str, done: str, statuses: list[int]) -> None:
    """The RELIABILITY.md row of requests that must all be refused with a 4xx, never a 5xx."""
    server_errors = sum(s >= 500 for s in statuses)
    record(
        case=case,
        done=done,
        outcome="all refused with 4xx" if not server_errors else f"{server_errors} x 5xx",
        tried=len(statuses),
        server_errors=server_errors,
    )


@pytest.mark.attacks
@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_ids_past_the_database_integer_are_refused_not_a_500(peers: Peers) -> None:
    tokens = {"admin": peers.fleet.admin_token, "ts": peers.ts_token, "agent": peers.agent_a}
    answers = []
    for component, who, method, path, body in CASES:
        base = peers.fleet.ns_url if component == "ns" else peers.ts_url
        status, detail = await call(method, base + path, tokens[who], body)
        answers.append((component, method, path, status, detail))
    _record_refusals(
        "Integers past the database column",
        f"{len(CASES)} requests with ids/exit codes of 2**31 and 2**63",
        [a[3] for a in answers],
    )
    assert all(a[3] < 500 for a in answers), answers
    assert all(a[3] in (404, 422) for a in answers), answers


@pytest.mark.attacks
@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_non_finite_times_in_events_are_refused_not_a_500(peers: Peers) -> None:
    # JSON has no NaN or Infinity, but Python's and JavaScript's encoders write them
    raw = (
        '{"events": [{"event_id": "%s", "execution_id": 1, "computer": "probe-a",'
        ' "kind": "started", "at": %s}]}'
    )
    answers = []
    for base, path, token in (
        (peers.fleet.ns_url, "/api/ts/events", peers.ts_token),
        (peers.ts_url, "/api/agent/events", peers.agent_a),
    ):
        for value in ("NaN", "Infinity", "-Infinity", "1e400"):
            status, _ = await call("POST", base + path, token, raw=raw % (uuid.uuid4(), value))
            answers.append((path, value, status))
    assert all(s < 500 for _, _, s in answers), answers


@pytest.mark.attacks
@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_lone_surrogates_in_strings_are_refused_not_a_500(peers: Peers) -> None:
    # "\ud800" is valid JSON but no Unicode character: UTF-8 cannot encode it, not to answer
    # with it nor to store it
    bad = "\\ud800"
    event = (
        '{"events": [{"event_id": "%s", "execution_id": 1, "computer": "probe-%s",'
        ' "kind": "started", "at": 1.0}]}'
    )
    cases = [
        (peers.fleet.ns_url, "/api/ts/events", peers.ts_token, event % (uuid.uuid4(), bad)),
        (peers.ts_url, "/api/agent/events", peers.agent_a, event % (uuid.uuid4(), bad)),
        # a 422 echoes the input: here an event id that is no UUID
        (
            peers.fleet.ns_url,
            "/api/ts/events",
            peers.ts_token,
            event.replace('"%s"', '"x%s"', 1) % (bad, "a"),
        ),
        (
            peers.fleet.ns_url,
            "/api/tasks",
            peers.fleet.admin_token,
            '{"name": "t-' + bad + '", "command": ["true"]}',
        ),
        (
            peers.fleet.ns_url,
            "/api/runs",
            peers.fleet.admin_token,
            '{"task_id": 1, "computers": ["pc-' + bad + '"]}',
        ),
    ]
    answers = []
    for base, path, token, raw in cases:
        status, detail = await call("POST", base + path, token, raw=raw)
        answers.append((path, status, detail))
    _record_refusals(
        "Lone surrogate escapes in JSON strings",
        f"{len(cases)} requests to the NS and task server with \\ud800 in a string",
        [a[1] for a in answers],
    )
    assert all(a[1] < 500 for a in answers), answers
    assert all(a[1] == 422 for a in answers), answers
    assert all("Unicode" in str(a[2]) for a in answers), answers  # the 422 says what is wrong
