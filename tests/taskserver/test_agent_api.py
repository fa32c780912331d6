"""The agent-facing API: pulls acknowledge tickles, CEM agents poll, agents see only their own."""

from __future__ import annotations

import asyncio
import hashlib
import uuid

from prometheus_client.parser import text_string_to_metric_families

import tickle
from tests.taskserver.conftest import SECRET, Agent, TaskServerHarness, wait_until, work_for
from tickle.messages import StatusEvent
from tickle.taskserver.store import Store


async def test_cem_agent_is_never_tickled_but_gets_its_work_by_polling(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    cem = await h.register_agent("laptop1", cem=True)
    other = await h.register_agent("pc1")
    h.ns.work = [work_for(1, "laptop1"), work_for(2, "pc1")]
    h.send_tickle(h.ns.tickle())
    await wait_until(lambda: other.socket.datagrams, what="the non-CEM agent's tickle")
    await wait_until(
        lambda: h.running.metrics.tickles_skipped_cem._value.get() >= 1, what="CEM skip counted"
    )
    assert cem.socket.datagrams == []
    assert cem.enrollment.policy.cem is True

    status, body = await h.call(cem, "GET", "/api/agent/tasks", params={"via": "poll"})
    assert status == 200
    assert [e["execution_id"] for e in body["executions"]] == [1]
    assert body["policy"]["cem"] is True
    assert h.running.metrics.polls._value.get() == 1
    assert cem.socket.datagrams == []


async def test_agent_pull_acks_the_tickle_and_queues_agent_pulled(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    h.ns.work = [work_for(7, "pc1")]
    h.send_tickle(h.ns.tickle())
    await wait_until(lambda: agent.socket.datagrams, what="the agent's tickle")

    status, body = await h.call(agent, "GET", "/api/agent/tasks", params={"via": "tickle"})
    assert status == 200
    assert [e["execution_id"] for e in body["executions"]] == [7]
    assert not h.running.agents.tickler.in_flight("pc1")  # acked: no more resends
    sent = len(agent.socket.datagrams)

    await wait_until(lambda: h.ns.events_of("agent_pulled"), what="agent_pulled at the NS")
    (pulled,) = h.ns.events_of("agent_pulled")
    assert (pulled.execution_id, pulled.via) == (7, "tickle")
    assert h.running.metrics.tickles_resent.labels(kind="tasks")._value.get() == 0
    assert h.running.metrics.pulls.labels(via="tickle")._value.get() == 1

    # a second pull returns the execution again but queues no second agent_pulled
    status, body = await h.call(agent, "GET", "/api/agent/tasks", params={"via": "poll"})
    assert [e["execution_id"] for e in body["executions"]] == [7]
    assert await h.reported(5)
    assert len(h.ns.events_of("agent_pulled")) == 1
    assert len(agent.socket.datagrams) == sent


async def test_agent_that_never_pulls_is_resent_then_reported_unreachable(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    h.ns.work = [work_for(1, "pc1")]
    h.send_tickle(h.ns.tickle())
    await wait_until(
        lambda: [s for s in h.ns.states if s.tickle_state == "unreachable"],
        within_s=5,
        what="the unreachable state at the NS",
    )
    assert len(agent.tickles("ts1")) == 3  # tickle_tries
    (state,) = [s for s in h.ns.states if s.tickle_state]
    assert (state.name, state.tickle_state) == ("pc1", "unreachable")
    assert h.running.metrics.tickles_unreachable._value.get() == 1


async def test_agent_cannot_read_or_report_another_agents_executions_nor_task_server_events(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    mine = await h.register_agent("pc1")
    theirs = await h.register_agent("pc2")
    await h.cache_work(work_for(1, "pc1"), work_for(2, "pc2"))

    status, body = await h.call(mine, "GET", "/api/agent/tasks")
    assert [e["execution_id"] for e in body["executions"]] == [1]

    # pc1 reporting an event about pc2's execution, as itself or as pc2
    for computer, execution_id in (("pc1", 2), ("pc2", 2), ("pc2", 1), ("pc2", 999)):
        status, body = await _post_event(h, mine, computer, execution_id, "started")
        assert status == 403, (computer, execution_id, body)
    # kinds only the task server reports (docs/ARCHITECTURE.md): 422, the detail a string
    for kind in ("agent_tickled", "agent_pulled"):
        status, body = await _post_event(h, mine, "pc1", 1, kind)
        assert status == 422, (kind, body)
        assert isinstance(body, dict)
        assert "reported by the task server" in body["detail"]
    assert await h.reported(5)
    assert h.ns.events_of("started") == []  # nothing refused was cached or forwarded
    status, _ = await _post_event(h, theirs, "pc2", 2, "started")
    assert status == 200


async def test_event_for_an_execution_this_task_server_does_not_hold_is_forwarded_to_the_ns(
    task_server: TaskServerHarness,
) -> None:
    # the agent moved here with events of work it got from its old task server (or the NS no
    # longer lists it): refusing them would block the agent's outbox for good; the NS decides
    h = task_server
    agent = await h.register_agent("pc1")
    await h.cache_work(work_for(1, "pc1"))
    status, body = await _post_event(h, agent, "pc1", 999, "finished", status="succeeded")
    assert status == 200, body
    await wait_until(lambda: h.ns.events_of("finished"), what="the event at the NS")
    assert [e.execution_id for e in h.ns.events_of("finished")] == [999]
    assert [w.execution_id for w in h.running.store.pending_work("pc1")] == [1]


async def test_calls_without_valid_credentials_get_401(task_server: TaskServerHarness) -> None:
    h = task_server
    await h.register_agent("pc1")
    forged = Agent("pc1", "not-a-token", b"", h._sockets[0], None)  # type: ignore[arg-type]
    for who in (None, forged):
        for method, path in (
            ("GET", "/api/agent/tasks"),
            ("GET", "/api/agent/policy"),
            ("POST", "/api/agent/events"),
        ):
            status, _ = await h.call(who, method, path, json={"events": []})
            assert status == 401, (who, path)
    assert await h.call(None, "GET", "/health") == (
        200,
        {"status": "ok", "component": "task-server", "version": tickle.__version__},
    )
    assert (await h.call(None, "GET", "/metrics"))[0] == 200


async def test_metrics_a_scrape_names_are_the_only_ones_exposed(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    status, text = await h.call(
        None, "GET", "/metrics", params=[("name[]", "tickle_polls_total"), ("name[]", "nothing")]
    )
    assert status == 200
    assert {f.name for f in text_string_to_metric_families(text)} == {"tickle_polls"}
    _, every = await h.call(None, "GET", "/metrics")
    assert len(list(text_string_to_metric_families(every))) > 10


async def test_registration_with_a_wrong_enrollment_secret_is_refused(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    body = {"enrollment_secret": "guess", "name": "pc9", "tickle_port": 50124}
    status, _ = await h.call(None, "POST", "/api/agent/register", json=body)
    assert status == 401
    assert h.ns.agent_registrations == []


async def test_an_agent_presenting_the_task_servers_secret_is_refused(
    task_server: TaskServerHarness,
) -> None:
    # the task servers' secret registers a task server at the NS, never an agent here
    h = task_server
    body = {"enrollment_secret": SECRET, "name": "pc9", "tickle_port": 50124}
    status, answer = await h.call(None, "POST", "/api/agent/register", json=body)
    assert (status, answer) == (401, {"detail": "wrong enrollment secret"})
    assert h.ns.agent_registrations == []


async def test_registration_passes_the_address_the_ts_saw_to_the_ns(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    await h.register_agent("pc1", reported_address="10.9.8.7")
    (reg,) = h.ns.agent_registrations
    assert (reg.reported_address, reg.observed_address) == ("10.9.8.7", "127.0.0.1")


async def test_events_are_cached_forwarded_and_finish_the_execution(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    await h.cache_work(work_for(1, "pc1"))

    status, body = await _post_event(h, agent, "pc1", 1, "finished", status="succeeded")
    assert status == 200
    assert len(body["accepted"]) == 1
    await wait_until(lambda: h.ns.events_of("finished"), what="the finished event at the NS")
    (finished,) = h.ns.events_of("finished")
    assert finished.cached_at is not None
    # done: the agent's next pull no longer returns it
    status, body = await h.call(agent, "GET", "/api/agent/tasks")
    assert body["executions"] == []


async def test_policy_never_carries_tasks_and_acks_the_settings_tickle(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    await h.cache_work(work_for(1, "pc1"))
    status, body = await h.call(agent, "GET", "/api/agent/policy")
    assert status == 200
    assert set(body) == {
        "settings_version", "task_request_interval_s", "poll_jitter_fraction", "cem",
        "long_poll", "long_poll_timeout_s",
    }  # fmt: skip
    assert h.running.agents.tickler.in_flight("pc1")  # the tasks tickle is not acked by it


async def test_pull_from_a_new_address_reports_it_to_the_ns(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    h.running.store.set_observed_address("pc1", "192.0.2.1")  # seen elsewhere before
    status, _ = await h.call(agent, "GET", "/api/agent/tasks")
    assert status == 200
    await wait_until(
        lambda: [s for s in h.ns.states if s.observed_address == "127.0.0.1"],
        what="the new observed address at the NS",
    )


async def _post_event(
    h: TaskServerHarness,
    agent: Agent,
    computer: str,
    execution_id: int,
    kind: str,
    **extra: object,
) -> tuple[int, object]:
    event = StatusEvent.model_validate(
        {
            "event_id": str(uuid.uuid4()),
            "execution_id": execution_id,
            "computer": computer,
            "kind": kind,
            "at": 1.0,
            **extra,
        }
    )
    return await h.call(
        agent, "POST", "/api/agent/events", json={"events": [event.model_dump(mode="json")]}
    )


async def test_agents_registering_at_once_are_each_answered_and_kept_durably(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    names = [f"pc{i:02d}" for i in range(30)]
    agents = await asyncio.gather(*(h.register_agent(name) for name in names))
    for agent in agents:  # each pulls with the credentials its own answer gave
        assert (await h.call(agent, "GET", "/api/agent/tasks"))[0] == 200
    on_disk = Store(h.state_dir)  # what a restart loads (the clients' group commits)
    try:
        assert {c.name: c.token_sha256 for c in on_disk.clients()} == {
            a.name: hashlib.sha256(a.token.encode()).hexdigest() for a in agents
        }
    finally:
        on_disk.close()
