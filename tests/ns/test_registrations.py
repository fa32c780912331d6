"""Who may register at the NS: a stable identity per computer and task server name, and the
operator's approval of new names (registration_approval = manual)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import pytest

from tests.ns.conftest import SECRET, FakeTaskServer, Ns, NsFactory
from tests.reliability import record

AGENT_A = "identity-of-agent-a-0123456789"
AGENT_B = "identity-of-agent-b-0123456789"


def _ts_body(ts: FakeTaskServer, identity: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "enrollment_secret": SECRET, "name": ts.name, "tickle_host": "127.0.0.1",
        "tickle_port": ts.port, "api_url": f"http://127.0.0.1:{ts.port}",
    }  # fmt: skip
    if identity is not None:
        body["identity"] = identity
    return body


async def _register_agent(ts: FakeTaskServer, name: str, identity: str) -> tuple[int, Any]:
    body = {"name": name, "tickle_host": "127.0.0.1", "identity": identity}
    return await ts.call("POST", "/api/ts/agents/register", json=body)


async def _client_token_sha(ts: FakeTaskServer, name: str) -> str:
    clients = await ts.ok("GET", "/api/ts/clients")
    return str(next(c["token_sha256"] for c in clients if c["name"] == name))


async def test_a_second_agent_under_a_registered_name_is_refused_409_and_the_first_kept(
    ns_factory: NsFactory,
) -> None:
    ns = await ns_factory()
    ts = await ns.task_server("ts1")
    status, first = await _register_agent(ts, "pc1", AGENT_A)
    assert status == 200
    kept = hashlib.sha256(first["token"].encode()).hexdigest()

    status, answer = await _register_agent(ts, "pc1", AGENT_B)
    assert status == 409
    assert "pc1 is registered to another agent" in answer["detail"]
    assert "tickle computers rekey pc1" in answer["detail"]
    assert await _client_token_sha(ts, "pc1") == kept  # the first agent keeps its credentials

    # the same agent again (a restart that lost its token, a failover) is served as before
    status, again = await _register_agent(ts, "pc1", AGENT_A)
    assert status == 200
    assert await _client_token_sha(ts, "pc1") == hashlib.sha256(again["token"].encode()).hexdigest()


async def test_rekey_lets_the_next_registration_bring_a_new_identity(ns_factory: NsFactory) -> None:
    ns = await ns_factory()
    ts = await ns.task_server("ts1")
    assert (await _register_agent(ts, "pc1", AGENT_A))[0] == 200
    assert await ns.ok("POST", "/api/computers/pc1/rekey") == {"kind": "computer", "name": "pc1"}

    status, _ = await _register_agent(ts, "pc1", AGENT_B)
    assert status == 200
    assert (await _register_agent(ts, "pc1", AGENT_A))[0] == 409  # B holds the name now
    status, answer = await ns.call("POST", "/api/computers/pc9/rekey")
    assert (status, answer["detail"]) == (
        404,
        "computer pc9 is not registered and has not asked to",
    )


async def test_a_task_server_name_keeps_its_identity_too(ns_factory: NsFactory) -> None:
    ns = await ns_factory()
    ts = await ns.task_server("ts1")
    assert (await ns.call("POST", "/api/ts/register", None, _ts_body(ts, AGENT_A)))[0] == 200
    status, answer = await ns.call("POST", "/api/ts/register", None, _ts_body(ts, AGENT_B))
    assert status == 409
    assert "task server ts1 is registered to another task server" in answer["detail"]
    assert (await ns.call("POST", "/api/ts/register", None, _ts_body(ts, AGENT_A)))[0] == 200
    await ns.ok("POST", "/api/task-servers/ts1/rekey")
    assert (await ns.call("POST", "/api/ts/register", None, _ts_body(ts, AGENT_B)))[0] == 200


async def _pending(ns: Ns) -> list[tuple[str, str, str]]:
    return [(r["kind"], r["name"], r["state"]) for r in await ns.ok("GET", "/api/registrations")]


async def test_manual_approval_holds_new_task_servers_and_agents_until_approved(
    ns_factory: NsFactory,
) -> None:
    ns = await ns_factory(registration_approval="manual")
    ts = FakeTaskServer(ns, "ts1")
    ts.port = 50199
    # without an identity, as the fake task server registers when it starts below
    status, answer = await ns.call("POST", "/api/ts/register", None, _ts_body(ts, None))
    assert status == 403
    assert answer["detail"] == (
        "task server ts1 awaits an operator's approval (`tickle task-servers approve ts1`)"
    )
    assert await _pending(ns) == [("task_server", "ts1", "pending")]
    assert (await ns.call("GET", "/api/task-servers"))[1] == []  # no credentials, no task server

    assert (await ns.ok("POST", "/api/task-servers/ts1/approve"))["state"] == "approved"
    await ts.start()  # registers as it asked
    assert ts.token
    assert await _pending(ns) == []

    status, answer = await _register_agent(ts, "pc1", AGENT_A)
    assert (status, answer["detail"]) == (
        403, "computer pc1 awaits an operator's approval (`tickle computers approve pc1`)"
    )  # fmt: skip
    listed = await ns.ok("GET", "/api/registrations?kind=computer")
    assert [(r["name"], r["task_server"], r["identity"]) for r in listed] == [
        ("pc1", "ts1", hashlib.sha256(AGENT_A.encode()).hexdigest()[:16])
    ]
    # another agent cannot slip in under the name that waits
    assert (await _register_agent(ts, "pc1", AGENT_B))[0] == 409
    await ns.ok("POST", "/api/computers/pc1/approve")
    assert (await _register_agent(ts, "pc1", AGENT_A))[0] == 200
    assert [c["name"] for c in await ns.ok("GET", "/api/computers")] == ["pc1"]
    ts.close()


async def test_a_rejected_agent_never_gets_credentials(
    ns_factory: NsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    ns = await ns_factory(registration_approval="manual")
    ts = FakeTaskServer(ns, "ts1")
    ts.port = 50199
    await ns.call("POST", "/api/ts/register", None, _ts_body(ts, None))
    await ns.ok("POST", "/api/task-servers/ts1/approve")
    await ts.start()
    with caplog.at_level(logging.WARNING, logger="tickle.ns.stores.registrations"):
        assert (await _register_agent(ts, "pc1", AGENT_A))[0] == 403
        assert (await _register_agent(ts, "pc1", AGENT_A))[0] == 403
    # the NS's log says it once, not at every try
    # (only the store's records: another test's logging set-up can let the migrations' through)
    says = [r.getMessage() for r in caplog.records if r.name == "tickle.ns.stores.registrations"]
    assert [m for m in says if "computer" in m] == [
        "computer pc1 asks to register through task server ts1 (from ?): waiting for approval "
        "(`tickle computers approve pc1`)"
    ]
    assert (await ns.ok("POST", "/api/computers/pc1/reject"))["state"] == "rejected"
    for _ in range(3):
        status, answer = await _register_agent(ts, "pc1", AGENT_A)
        assert (status, answer["detail"]) == (403, "computer pc1 was rejected by an operator")
    assert await _pending(ns) == [("computer", "pc1", "rejected")]
    assert await ns.ok("GET", "/api/computers") == []
    status, answer = await ns.call("POST", "/api/computers/pc2/approve")
    assert status == 404
    assert answer["detail"].startswith("no registration of computer pc2 awaits a decision")
    ts.close()


async def test_registration_routes_need_the_admin_token(ns_factory: NsFactory) -> None:
    ns = await ns_factory()
    ts = await ns.task_server("ts1")
    for method, path in [("GET", "/api/registrations"), ("POST", "/api/computers/pc1/approve"),
                         ("POST", "/api/task-servers/ts1/rekey")]:  # fmt: skip
        assert (await ns.call(method, path, token=None))[0] == 401
        assert (await ns.call(method, path, token=ts.token))[0] == 403


async def test_registrations_arriving_together_are_each_recorded_once_and_answered(
    ns_factory: NsFactory,
) -> None:
    ns = await ns_factory()
    ts = await ns.task_server("ts1")
    names = [f"pc{i:02d}" for i in range(40)]
    answers = await asyncio.gather(
        *(_register_agent(ts, name, f"identity-of-{name}-0123456789") for name in names),
        _register_agent(ts, "twice", AGENT_A),
        _register_agent(ts, "twice", AGENT_B),  # another agent under the same name, meanwhile
    )
    assert all(status == 200 for status, _ in answers[:40])
    assert sorted(status for status, _ in answers[40:]) == [200, 409]  # whichever came first
    tokens = {a["name"]: a["token"] for status, a in answers if status == 200}
    clients = await ts.ok("GET", "/api/ts/clients")
    assert sorted(c["name"] for c in clients) == [*names, "twice"]  # each once
    for c in clients:  # each holds the credentials its own answer gave
        assert c["token_sha256"] == hashlib.sha256(tokens[c["name"]].encode()).hexdigest()
    record(
        case="registrations arriving together (NS group commit)",
        done="42 agents register at once through one task server, two of them under one name "
        "with different identities",
        outcome="each answered as if alone and recorded once; the second under the shared name 409",
        sent=len(answers),
        recorded=len(clients),
        duplicated=len(clients) - len({c["name"] for c in clients}),
    )
