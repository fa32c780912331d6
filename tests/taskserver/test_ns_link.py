"""The task server's link to the NS: durable events, native tickles, settings, credentials."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import re
import uuid

import pytest

from tests.reliability import record
from tests.taskserver.conftest import (
    FakeAgentSocket,
    FakeNs,
    TaskServerHarness,
    wait_until,
    work_for,
)
from tickle import wire
from tickle.backoff import Backoff
from tickle.http import ApiError
from tickle.messages import ClientInfo, SettingsOut, StatusEvent, TsPullVia
from tickle.taskserver.ns_sync import Coalesced
from tickle.taskserver.service import main


def _event(execution_id: int, computer: str, kind: str = "started") -> dict[str, object]:
    return StatusEvent(
        event_id=str(uuid.uuid4()), execution_id=execution_id, computer=computer,
        kind=kind, at=1.0,  # type: ignore[arg-type]
    ).model_dump(mode="json")  # fmt: skip


@pytest.mark.timeout(60)
async def test_events_posted_while_the_ns_is_down_are_delivered_after_it_returns(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    await h.cache_work(work_for(1, "pc1"))
    await h.reported(5)

    await h.ns.stop()
    events = [_event(1, "pc1", "started"), _event(1, "pc1", "finished")]
    status, body = await h.call(agent, "POST", "/api/agent/events", json={"events": events})
    assert status == 200, body  # accepted: durable at the TS although the NS is down
    assert h.running.outbox.depth() == 2

    await h.ns.start()  # same port
    await wait_until(
        lambda: {e["event_id"] for e in events} <= set(h.ns.events),
        within_s=20,
        what="the events at the restarted NS",
    )
    assert await h.reported(5)


@pytest.mark.timeout(60)
async def test_events_cached_while_the_ns_is_down_survive_a_task_server_restart(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    await h.cache_work(work_for(1, "pc1"))
    await h.reported(5)

    await h.ns.stop()
    events = [_event(1, "pc1", "started"), _event(1, "pc1", "finished")]
    status, _ = await h.call(agent, "POST", "/api/agent/events", json={"events": events})
    assert status == 200
    h.pin_ports()
    await h.stop()  # the task server goes down with the events only in its outbox

    await h.ns.start()
    await h.start()
    await wait_until(
        lambda: {e["event_id"] for e in events} <= set(h.ns.events),
        within_s=20,
        what="the events delivered by the restarted task server",
    )
    assert h.ns.count("register") == 1  # the restart used the stored credentials


async def test_a_task_server_the_ns_does_not_admit_yet_asks_again_with_its_one_identity(
    fake_ns: FakeNs, harness: TaskServerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    awaits = "task server ts1 awaits an operator's approval (`tickle task-servers approve ts1`)"
    held = "task server ts1 is registered to another task server (a different identity): refused"
    fake_ns.refusals = [(403, awaits), (409, held)]
    with caplog.at_level(logging.WARNING, logger="tickle.taskserver.service"):
        await harness.start()  # waits, then starts once admitted
    assert fake_ns.count("register") == 3
    identities = {r.identity for r in [*fake_ns.refused, *fake_ns.registrations]}
    assert len(identities) == 1
    assert None not in identities
    said = [r.getMessage() for r in caplog.records if "does not admit" in r.getMessage()]
    assert len(said) == 2
    assert awaits in said[0]
    assert held in said[1]


async def test_work_found_by_the_periodic_check_is_tickled_without_an_ns_tickle(
    fake_ns: FakeNs, harness: TaskServerHarness
) -> None:
    fake_ns.settings = fake_ns.settings.model_copy(update={"ts_check_interval_s": 1})
    await harness.start()
    agent = await harness.register_agent("pc1")
    checks = fake_ns.count("work")
    fake_ns.work = [work_for(1, "pc1")]  # no NS tickle follows

    await wait_until(lambda: agent.socket.datagrams, within_s=5, what="the native tickle")
    assert fake_ns.count("work") > checks
    assert harness.running.metrics.tickles_received.labels(kind="tasks")._value.get() == 0
    assert agent.tickles("ts1")[0].kind is wire.Kind.TASKS


async def test_a_work_pull_that_failed_while_the_ns_restarts_is_tried_again_until_it_answers(
    fake_ns: FakeNs, harness: TaskServerHarness
) -> None:
    # the NS died under the pull its tickle caused: the work must not wait for the periodic
    # check (a minute), nor for a tickle from an NS that may not know it still owes one
    await harness.start()
    agent = await harness.register_agent("pc1")
    fake_ns.work = [work_for(1, "pc1")]
    fake_ns.work_down = 2
    fake_ns.refusal_retry_after_s = 1
    pulls = fake_ns.count("work")
    harness.send_tickle(fake_ns.tickle())

    await wait_until(lambda: agent.socket.datagrams, within_s=15, what="the work, tickled")
    tried = fake_ns.count("work") - pulls
    record(
        case="NS restarting under a task server's work pull",
        done="the NS's tickle makes the task server pull; the NS answers 503 (Retry-After 1) "
        "twice, then the work",
        outcome="pulled again after Retry-After until answered; the agent tickled"
        if tried == 3
        else f"{tried} pulls",
        tried=tried,
    )
    assert tried == 3  # two refused, then the one that answered
    assert fake_ns.vias("work")[-3:] == ["tickle"] * 3  # a retry acknowledges the NS's tickle
    assert harness.running.metrics.tickles_received.labels(kind="tasks")._value.get() == 1


async def test_work_cached_before_a_restart_is_tickled_at_start(
    fake_ns: FakeNs, harness: TaskServerHarness
) -> None:
    await harness.start()
    agent = await harness.register_agent("pc1")
    await harness.cache_work(work_for(1, "pc1"))
    harness.pin_ports()
    await harness.stop()
    agent.socket.datagrams.clear()
    fake_ns.work_gate = asyncio.Event()  # the NS holds the pull: only the cache explains a tickle

    await harness.start()
    await wait_until(lambda: agent.socket.datagrams, within_s=5, what="a tickle from the cache")
    assert agent.tickles("ts1")[0].kind is wire.Kind.TASKS


async def test_work_an_ns_tickle_brings_while_the_task_server_starts_is_tickled_at_once(
    fake_ns: FakeNs, harness: TaskServerHarness
) -> None:
    # S6: a restarted task server's tickle port took the NS's tickle, and its work pull ran,
    # before its agent tickler had a socket: each first send was "not sent: closed", then
    # resent (122 of 2,500 agents tickled ~9 s late)
    await harness.start()
    agent = await harness.register_agent("pc1")
    harness.pin_ports()
    await harness.stop()
    fake_ns.work = [work_for(1, "pc1")]
    fake_ns.settings_gate = asyncio.Event()  # the start waits for the settings meanwhile
    harness.overrides["ns_timeout_s"] = 30  # ... all along
    settings_before = fake_ns.count("settings")
    work_before = fake_ns.count("work")

    starting = asyncio.create_task(harness.start())
    try:
        await wait_until(lambda: fake_ns.count("settings") > settings_before, what="the start")
        harness.send_tickle(fake_ns.tickle())
        await wait_until(lambda: fake_ns.count("work") > work_before, what="the work pull")
        await wait_until(lambda: agent.socket.datagrams, what="the agent's tickle")
        assert not starting.done()
        assert agent.tickles("ts1")[0].kind is wire.Kind.TASKS
        assert harness.running.metrics.tickles_resent.labels(kind="tasks")._value.get() == 0  # type: ignore[attr-defined]
    finally:
        fake_ns.settings_gate.set()
        await starting


async def test_settings_tickle_pulls_settings_and_the_policy_shows_the_new_interval(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    assert agent.enrollment.policy.task_request_interval_s == 1800
    h.ns.settings = SettingsOut(
        version=2, task_request_interval_s=120, poll_jitter_fraction=0.2, ts_check_interval_s=60
    )
    h.send_tickle(h.ns.tickle(wire.Kind.SETTINGS))

    # the agent gets a settings tickle (to refresh its policy, not to pull tasks)
    await wait_until(lambda: agent.socket.datagrams, what="the agent's settings tickle")
    assert [t.kind for t in agent.tickles("ts1")] == [wire.Kind.SETTINGS]
    # a refresh the operator asked for does not prove the settings tickle arrived...
    status, policy = await h.call(agent, "GET", "/api/agent/policy")
    assert status == 200
    assert (policy["settings_version"], policy["task_request_interval_s"]) == (2, 120)
    assert policy["poll_jitter_fraction"] == 0.2
    assert h.running.agents.tickler.in_flight("pc1", wire.Kind.SETTINGS)
    # ...the fetch the tickle caused does, and acknowledges it
    status, _ = await h.call(agent, "GET", "/api/agent/policy?via=tickle")
    assert status == 200
    assert not h.running.agents.tickler.in_flight("pc1", wire.Kind.SETTINGS)


async def test_task_server_registers_again_when_the_ns_rejects_its_token(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    assert h.ns.count("register") == 1
    h.ns.ts_token = "rotated-by-the-ns"  # the stored token no longer works
    h.ns.work = []
    await h.running.sync.work.run("check")
    assert h.ns.count("register") == 2
    assert h.ns.calls[-1] == "work"  # the pull was repeated with the new token


def test_missing_enrollment_secret_exits_2_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TICKLE_TS_ENROLLMENT_SECRET", raising=False)
    monkeypatch.delenv("TICKLE_TS_CONFIG", raising=False)
    # a port that would fail to bind if main got that far: the check must come first
    code = main(["--api-port", "1", "--tickle-port", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("tickle task-server:")
    assert "enrollment_secret" in err
    assert "TICKLE_TS_ENROLLMENT_SECRET" in err


@pytest.mark.parametrize(
    ("agents_secret", "says"),
    [(None, "TICKLE_TS_AGENT_ENROLLMENT_SECRET"), ("same-secret-0123", "must differ")],
)
def test_the_agents_enrollment_secret_is_required_and_apart_from_the_task_servers(
    agents_secret: str | None,
    says: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # one secret for both would let any agent register as a task server and take its clients
    monkeypatch.delenv("TICKLE_TS_CONFIG", raising=False)
    monkeypatch.setenv("TICKLE_TS_ENROLLMENT_SECRET", "same-secret-0123")
    monkeypatch.delenv("TICKLE_TS_AGENT_ENROLLMENT_SECRET", raising=False)
    if agents_secret is not None:
        monkeypatch.setenv("TICKLE_TS_AGENT_ENROLLMENT_SECRET", agents_secret)
    assert main(["--api-port", "1", "--tickle-port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tickle task-server:")
    assert "agent_enrollment_secret" in err
    assert says in err
    assert "same-secret-0123" not in err


async def test_start_gives_up_clearly_when_the_ns_stays_unreachable(
    harness: TaskServerHarness, fake_ns: FakeNs
) -> None:
    from tickle.taskserver.service import StartupError

    await fake_ns.stop()
    harness.overrides["ns_wait_s"] = 1.5
    with pytest.raises(StartupError, match="unreachable"):
        await harness.start()


async def test_start_waits_what_a_busy_ns_said_in_retry_after_before_asking_again(
    harness: TaskServerHarness, fake_ns: FakeNs, caplog: pytest.LogCaptureFixture
) -> None:
    fake_ns.refusals = [(503, "starting up")]
    fake_ns.refusal_retry_after_s = 1
    with caplog.at_level(logging.WARNING, logger="tickle.taskserver.service"):
        await harness.start()

    assert len(fake_ns.refused) == 1
    assert len(fake_ns.registrations) == 1
    waits = [
        float(m.group(1))
        for r in caplog.records
        if (m := re.search(r"retry 1 in ([0-9.]+)s", r.getMessage()))
    ]
    # Retry-After, plus this try's share of the spread (full jitter over [0, 0.5 s])
    assert len(waits) == 1
    assert 1.0 <= waits[0] <= 1.5


async def test_an_event_the_ns_refuses_for_good_does_not_block_the_others(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    await h.cache_work(work_for(1, "pc1"), work_for(2, "pc1"))
    h.ns.refuse_executions = {2}
    events = [_event(2, "pc1", "started"), _event(1, "pc1", "started")]
    status, _ = await h.call(agent, "POST", "/api/agent/events", json={"events": events})
    assert status == 200
    await wait_until(lambda: h.ns.events_of("started"), what="the acceptable event at the NS")
    assert [e.execution_id for e in h.ns.events_of("started")] == [1]
    assert await h.reported(5)


async def test_an_event_the_ns_leaves_out_of_accepted_is_dropped_and_blocks_nothing(
    task_server: TaskServerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    h.ns.omit_executions = {2}
    refused = _event(2, "pc1", "finished")
    events = [refused, _event(1, "pc1", "started")]
    status, _ = await h.call(agent, "POST", "/api/agent/events", json={"events": events})
    assert status == 200
    await wait_until(lambda: h.ns.events_of("started"), what="the acceptable event at the NS")
    # the refused event neither stays queued (retried forever) nor delays the next events
    assert await h.reported(5)
    assert h.running.outbox.depth() == 0
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(str(refused["event_id"]) in msg for msg in errors), errors


async def test_a_batch_too_large_for_the_ns_is_sent_again_in_parts_and_nothing_is_lost(
    task_server: TaskServerHarness,
) -> None:
    task_server.ns.max_batch_events = 1  # the NS answers 413 to a batch of more than one event
    agent = await task_server.register_agent("pc1")
    events = [_event(1, "pc1", "started") for _ in range(3)]
    status, _ = await task_server.call(agent, "POST", "/api/agent/events", json={"events": events})
    assert status == 200
    assert await task_server.reported(10)
    assert sorted(task_server.ns.events) == sorted(str(e["event_id"]) for e in events)


async def _pulls_when_the_ns_is_back(retry_after: float | None, wait_s: float) -> list[str]:
    """A work pull answered 503 (with `retry_after`) under a 60 s backoff, then the NS answers
    another request: the pulls made within `wait_s` of that (their `via`)."""
    runs: list[str] = []

    async def job(via: TsPullVia) -> None:
        runs.append(via)
        if len(runs) == 1:
            raise ApiError(503, "restarting", "http://ns/api/ts/work", retry_after)

    pull = Coalesced("work pull", job, Backoff(base_s=60.0, max_s=60.0, tries=None, jitter=0))
    pull.trigger("tickle")
    await wait_until(lambda: runs, within_s=5, what="the first pull")
    await asyncio.sleep(0)  # into the retry's wait
    pull.retry_now()  # the NS answered another request
    with contextlib.suppress(AssertionError):
        await wait_until(lambda: len(runs) == 2, within_s=wait_s, what="the pull again")
    await pull.close()
    return runs


async def test_a_work_pull_waiting_out_its_retry_goes_once_the_ns_answers_another_request() -> None:
    # the pull that found the NS away goes when the NS is back, not 5-7 s later on the retry's
    # own schedule (S6 of issue 10); it is still the tickle's pull: it acknowledges the tickle
    assert await _pulls_when_the_ns_is_back(None, 5) == ["tickle", "tickle"]


async def test_a_work_pull_waits_out_the_retry_after_the_ns_said_whatever_else_it_answers() -> None:
    assert await _pulls_when_the_ns_is_back(60.0, 0.5) == ["tickle"]


@pytest.mark.timeout(60)
async def test_work_for_a_client_it_does_not_know_yet_makes_it_learn_the_clients_then_tickle(
    task_server: TaskServerHarness,
) -> None:
    # an agent registered through another NS process (or moved here) appears in a work pull
    # before this task server has its key: it asks the NS for its clients first
    h = task_server
    await h.register_agent("pc1")
    loop = asyncio.get_running_loop()
    _, sock = await loop.create_datagram_endpoint(FakeAgentSocket, local_addr=("127.0.0.1", 0))
    key = os.urandom(32)
    h.ns.clients = {
        "pc9": ClientInfo(
            name="pc9", token_sha256=hashlib.sha256(b"pc9-token").hexdigest(),
            tickle_key=base64.b64encode(key).decode(), tickle_host="127.0.0.1",
            tickle_port=sock.port, cem=False,
        ),
    }  # fmt: skip
    try:
        asked = h.ns.count("clients")
        await h.cache_work(work_for(1, "pc1"))
        assert h.ns.count("clients") == asked  # every computer known: no need to ask
        await h.cache_work(work_for(1, "pc1"), work_for(9, "pc9"))
        assert h.ns.count("clients") == asked + 1
        await wait_until(lambda: sock.datagrams, what="a tickle to the new client")
        tickle = wire.TickleGuard(keys={h.running.settings.name: key}).check(sock.datagrams[0])
        assert tickle.kind is wire.Kind.TASKS
    finally:
        sock.close()
