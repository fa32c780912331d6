"""Schemathesis against the real NS and task server: generated requests never get a 5xx.

Requests carry valid credentials for their route (admin, task-server or agent token, obtained by
registering over HTTP as a real peer does), so they get past authentication into validation and the
handlers; registration routes get the real enrollment secret in every other generated body.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.attacks.conftest import Peers, call
from tests.integration.conftest import eventually
from tests.reliability import record

# per operation and generation mode: 26 operations x 2 modes x 50 take ~25 s here
MAX_EXAMPLES = 50


def _token_for(component: str, path: str, peers: Peers) -> str:
    if component == "ts":
        return peers.agent_a
    return peers.ts_token if path.startswith("/api/ts/") else peers.fleet.admin_token


def _fuzz(component: str, base_url: str, peers: Peers) -> tuple[int, Counter[int], list[str]]:
    """Fuzz every operation of one component; returns (operations, statuses, 5xx failures)."""
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json", timeout=10)
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    operations = 0
    tick = itertools.count()  # alternates: the generated (wrong) secret, then the real one
    # the secret each component's registration takes: the task servers' at the NS, the agents'
    # at a task server
    fleet = peers.fleet
    secret = fleet.enrollment_secret if component == "ns" else fleet.agent_enrollment_secret
    for result in schema.get_all_operations():
        op = result.ok()
        operations += 1
        headers = {"Authorization": f"Bearer {_token_for(component, op.path, peers)}"}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @given(case=op.as_strategy(mode, headers=headers))
            def probe(case: Any) -> None:
                body = case.body
                if isinstance(body, dict) and "enrollment_secret" in body and next(tick) % 2:
                    body["enrollment_secret"] = secret  # get past the secret into the handler
                response = case.call(base_url=base_url, timeout=15)
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    failures.append(
                        f"{component} {case.method} {case.formatted_path} -> "
                        f"{response.status_code}: {response.text[:300]} "
                        f"(query={case.query!r} body={str(case.body)[:300]})"
                    )

            try:
                probe()
            except Unsatisfiable:  # nothing to make invalid (e.g. GET /health in negative mode)
                continue
    return operations, statuses, failures


def _long_poll_off(peers: Peers) -> None:
    """Long-poll off again, once the task server hands that policy down. The NS's fuzzing may
    turn it on (the settings are one of its routes) and the probe agents, which answer no tickle,
    are unreachable: the task server then holds their long-poll up to its timeout (5-600 s), as it
    should, past the fuzzer's 15 s read timeout."""

    async def off() -> None:
        fleet = peers.fleet
        status, body = await call(
            "PUT", fleet.ns_url + "/api/settings", fleet.admin_token, body={"long_poll": False}
        )
        assert status == 200, body

        async def handed_down() -> bool:
            status, policy = await call("GET", peers.ts_url + "/api/agent/policy", peers.agent_a)
            return status == 200 and policy["long_poll"] is False

        await eventually(handed_down, 30.0, "the task server's policy with long-poll off")

    asyncio.run(off())


@pytest.mark.attacks
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_generated_requests_never_get_a_5xx_from_ns_or_task_server(peers: Peers) -> None:
    started = time.monotonic()
    ns_ops, ns_statuses, ns_failures = _fuzz("ns", peers.fleet.ns_url, peers)
    _long_poll_off(peers)
    ts_ops, ts_statuses, ts_failures = _fuzz("ts", peers.ts_url, peers)
    wall = time.monotonic() - started
    tried = sum(ns_statuses.values()) + sum(ts_statuses.values())
    failures = ns_failures + ts_failures
    record(
        case="Schemathesis on the NS and task server APIs",
        done=f"{ns_ops + ts_ops} operations, positive and negative generated requests with "
        "valid tokens",
        outcome="no 5xx" if not failures else f"{len(failures)} x 5xx",
        tried=tried,
        operations=ns_ops + ts_ops,
        server_errors=len(failures),
        answers_2xx=sum(n for s, n in (ns_statuses + ts_statuses).items() if s < 300),
        answers_4xx=sum(n for s, n in (ns_statuses + ts_statuses).items() if 400 <= s < 500),
        wall_s=round(wall, 1),
    )
    assert ns_ops >= 15
    assert ts_ops >= 5
    assert not failures, "\n".join(failures[:20])
    # the fuzzing reached the handlers, not only the validation
    assert any(200 <= s < 300 for s in ns_statuses)
    assert any(200 <= s < 300 for s in ts_statuses)
