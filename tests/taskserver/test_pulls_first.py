"""A fan-out's pulls first: while a tickled agent's pull is due, the agents' status events are
held (`pulls_first_s` at most), then committed together; an agent alone is never held. At the
connections: an agent's connection is not read once its pull is answered while another agent's
pull is due (`pulls_first_s` at most), so the status events it posts next wait unread."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest

from tests.taskserver.conftest import Agent, TaskServerHarness, wait_until, work_for
from tickle import clock
from tickle.front import AtOnceFront
from tickle.messages import StatusEvent
from tickle.taskserver import state_reporter, work_cache

NO_RESEND_S = 60  # the tickle is not resent within a test: its pull stays due until it comes
PULL = "/api/agent/tasks?via=tickle"
EVENTS = "/api/agent/events"


def _event(execution_id: int, computer: str) -> dict[str, object]:
    return StatusEvent(
        event_id=str(uuid.uuid4()), execution_id=execution_id, computer=computer,
        kind="started", at=1.0,
    ).model_dump(mode="json")  # fmt: skip


def _posting(h: TaskServerHarness, agent: Agent, event: dict[str, object]) -> asyncio.Task[Any]:
    return asyncio.create_task(h.call(agent, "POST", "/api/agent/events", json={"events": [event]}))


def _watch_held(h: TaskServerHarness) -> list[int]:
    """For each event post that reaches the work cache, how many writes it holds once the post
    queued its own (held, or in this turn's commit)."""
    cache = h.running.work_cache
    taken = cache.take_events
    held: list[int] = []

    async def watching(computer: str, events: Any) -> list[str]:
        call = asyncio.ensure_future(taken(computer, events))
        await asyncio.sleep(0)  # it queued its write
        held.append(len(cache._held))
        return await call

    cache.take_events = watching  # type: ignore[method-assign]
    return held


async def _started(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch, pulls_first_s: float
) -> TaskServerHarness:
    """The task server started with `pulls_first_s`, its tickles not resent within a test."""
    # a fleet, not an agent alone: any other agent's post within a minute says so
    monkeypatch.setattr(work_cache, "ALONE_WINDOW_S", 60.0)
    harness.overrides.update(
        pulls_first_s=pulls_first_s, tickle_backoff_s=NO_RESEND_S,
        tickle_backoff_max_s=NO_RESEND_S,
    )  # fmt: skip
    h = harness
    await h.start()
    await wait_until(lambda: h.ns.count("work") >= 1, what="the first work pull")
    return h


async def _fan_out(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch, pulls_first_s: float
) -> tuple[Agent, Agent, Agent]:
    """A task server with one tickled agent whose pull is due, and two CEM agents, `pc1` having
    posted (alone: committed at once) so that `pc2` is not alone."""
    h = await _started(harness, monkeypatch, pulls_first_s)
    tickled = await h.register_agent("tickled")
    pc1, pc2 = await h.register_agent("pc1", cem=True), await h.register_agent("pc2", cem=True)
    status, _ = await _posting(h, pc1, _event(1, "pc1"))
    assert status == 200
    await h.cache_work(work_for(9, "tickled"))
    await wait_until(lambda: tickled.socket.datagrams, what="the tickle")
    assert h.running.pulls_due.count == 1
    return tickled, pc1, pc2


@pytest.mark.timeout(60)
async def test_events_wait_while_a_tickled_agents_pull_is_due_and_go_together_once_it_came(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    tickled, pc1, pc2 = await _fan_out(h, monkeypatch, pulls_first_s=5)
    second, third = _event(2, "pc2"), _event(3, "pc1")
    posts = [_posting(h, pc2, second), _posting(h, pc1, third)]
    await wait_until(lambda: len(h.running.work_cache._held) == 2, what="both posts held")
    await asyncio.sleep(0.05)  # some turns of the loop: held, not committed nor answered
    assert not any(p.done() for p in posts)
    assert not {second["event_id"], third["event_id"]} & h.ns.events.keys()
    # the pull is served while the events wait: the fan-out's pulls first
    status, body = await h.call(tickled, "GET", "/api/agent/tasks", params={"via": "tickle"})
    assert status == 200
    assert [e["execution_id"] for e in body["executions"]] == [9]
    assert h.running.pulls_due.count == 0
    answers = await asyncio.wait_for(asyncio.gather(*posts), 10)
    assert [status for status, _ in answers] == [200, 200]
    await wait_until(
        lambda: {second["event_id"], third["event_id"]} <= h.ns.events.keys(),
        what="both events at the NS",
    )


@pytest.mark.timeout(60)
async def test_events_held_for_pulls_due_go_after_pulls_first_s_at_most(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    _, _, pc2 = await _fan_out(h, monkeypatch, pulls_first_s=0.2)
    event = _event(2, "pc2")
    status, body = await asyncio.wait_for(_posting(h, pc2, event), 10)
    assert status == 200, body
    assert body["accepted"] == [event["event_id"]]
    assert h.running.pulls_due.count == 1  # answered while the pull is still due
    await wait_until(lambda: event["event_id"] in h.ns.events, what="the event at the NS")


@pytest.mark.timeout(60)
async def test_with_pulls_first_s_0_events_are_not_held_for_pulls_due(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    _, _, pc2 = await _fan_out(h, monkeypatch, pulls_first_s=0)
    held = _watch_held(h)
    status, _ = await asyncio.wait_for(_posting(h, pc2, _event(2, "pc2")), 10)
    assert status == 200
    assert held == [0]
    assert h.running.pulls_due.count == 1


@pytest.mark.timeout(60)
async def test_an_agent_alone_is_not_held_for_pulls_due(harness: TaskServerHarness) -> None:
    # S1: one agent's run-now; another agent's tickle unanswered must not delay its events
    harness.overrides.update(
        pulls_first_s=5, tickle_backoff_s=NO_RESEND_S, tickle_backoff_max_s=NO_RESEND_S
    )
    h = harness
    await h.start()
    await wait_until(lambda: h.ns.count("work") >= 1, what="the first work pull")
    tickled = await h.register_agent("tickled")
    alone = await h.register_agent("pc1", cem=True)
    await h.cache_work(work_for(9, "tickled"))
    await wait_until(lambda: tickled.socket.datagrams, what="the tickle")
    held = _watch_held(h)
    status, _ = await asyncio.wait_for(_posting(h, alone, _event(1, "pc1")), 10)
    assert status == 200
    assert held == [0]
    assert h.running.pulls_due.count == 1


def _watch_arrivals(h: TaskServerHarness) -> list[float]:
    """When each request of an agent that the task server took a clock sample of arrived."""
    clocks = h.running.agent_clocks
    assert clocks is not None
    sample = clocks.sample
    arrivals: list[float] = []

    def watching(name: str, their_time: float, arrived_at: float, tickled: bool) -> None:
        arrivals.append(arrived_at)
        sample(name, their_time, arrived_at, tickled)

    clocks.sample = watching  # type: ignore[method-assign]
    return arrivals


class _KeptAlive:
    """One agent's keep-alive connection to the task server, as an agent's HTTP client keeps it:
    its pull, then its status events, on the same connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, h: TaskServerHarness) -> _KeptAlive:
        return cls(*await asyncio.open_connection("127.0.0.1", h.running.api_port))

    def send(self, agent: Agent, method: str, target: str, body: object = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: ts\r\nAuthorization: Bearer {agent.token}\r\n"
            f"{clock.TIME_HEADER}: {clock.header_value(time.time())}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            + data
        )

    async def answer(self) -> tuple[int, Any]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        body = await self.reader.readexactly(int(headers["content-length"]))
        return int(lines[0].split()[1]), json.loads(body)

    async def call(
        self, agent: Agent, method: str, target: str, body: object = None, within_s: float = 10
    ) -> Any:
        self.send(agent, method, target, body)
        return await asyncio.wait_for(self.answer(), within_s)

    def close(self) -> None:
        self.writer.close()


async def _tickled_pull(h: TaskServerHarness, agent: Agent) -> None:
    """`agent` pulls as its tickle asks (answered 200)."""
    status, _ = await h.call(agent, "GET", "/api/agent/tasks", params={"via": "tickle"})
    assert status == 200


async def _two_tickled(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch, pulls_first_s: float
) -> tuple[Agent, Agent]:
    """A task server with two tickled agents, both pulls due."""
    h = await _started(harness, monkeypatch, pulls_first_s)
    first, second = await h.register_agent("pc1"), await h.register_agent("pc2")
    await h.cache_work(work_for(1, "pc1"), work_for(2, "pc2"))
    await wait_until(
        lambda: first.socket.datagrams and second.socket.datagrams, what="both tickles"
    )
    assert h.running.pulls_due.count == 2
    return first, second


@pytest.mark.timeout(60)
async def test_an_agents_events_after_its_pull_wait_unserved_while_another_pull_is_due(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    first, second = await _two_tickled(h, monkeypatch, pulls_first_s=5)
    posts = _watch_held(h)  # one entry per event post that reaches the work cache
    arrivals = _watch_arrivals(h)
    conn = await _pulled(h, first, 1)
    try:
        sent_at = time.time()
        conn.send(first, "POST", EVENTS, {"events": [_event(1, "pc1")]})
        answer = asyncio.create_task(conn.answer())
        await asyncio.sleep(0.2)  # some turns of the loop: the post is not served
        assert not answer.done()
        assert posts == []
        assert h.running.api_request_hold is not None
        assert h.running.api_request_hold.held == 1
        # the other agent's pull is served meanwhile; once no pull is due, the post is served
        released_at = time.time()
        status, body = await h.call(second, "GET", "/api/agent/tasks", params={"via": "tickle"})
        assert (status, [e["execution_id"] for e in body["executions"]]) == (200, [2])
        status, ack = await asyncio.wait_for(answer, 10)
        assert status == 200
        assert len(ack["accepted"]) == 1
        assert len(posts) == 1
        assert h.running.api_request_hold.held == 0
        # its clock sample is taken against when it came, not when it was served
        assert sent_at <= arrivals[-1] < released_at
    finally:
        conn.close()


async def _pulled(h: TaskServerHarness, agent: Agent, execution_id: int) -> _KeptAlive:
    """A kept-alive connection on which `agent` has pulled its one execution."""
    conn = await _KeptAlive.open(h)
    status, body = await conn.call(agent, "GET", PULL)
    assert (status, [e["execution_id"] for e in body["executions"]]) == (200, [execution_id])
    return conn


async def _pull_then_post(h: TaskServerHarness, agent: Agent, execution_id: int) -> list[str]:
    """`agent` pulls its tasks, then posts a status event, on one kept-alive connection; the
    ids accepted."""
    conn = await _pulled(h, agent, execution_id)
    try:
        event = _event(execution_id, agent.name)
        status, ack = await conn.call(agent, "POST", EVENTS, {"events": [event]})
        assert status == 200, ack
        return list(ack["accepted"])
    finally:
        conn.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("pulls_first_s", [0.2, 0], ids=["after-pulls-first-s", "hold-off"])
async def test_an_agents_events_after_its_pull_are_served_while_a_pull_is_due(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch, pulls_first_s: float
) -> None:
    # after `pulls_first_s` at most; at once with `pulls_first_s` 0 (no hold at all)
    h = harness
    first, _ = await _two_tickled(h, monkeypatch, pulls_first_s=pulls_first_s)
    assert (h.running.api_request_hold is None) == (pulls_first_s == 0)
    assert len(await _pull_then_post(h, first, 1)) == 1
    assert h.running.pulls_due.count == 1  # served while the other pull is still due


@pytest.mark.timeout(60)
async def test_the_last_pull_due_leaves_its_connection_read(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    first, second = await _two_tickled(h, monkeypatch, pulls_first_s=5)
    await _tickled_pull(h, first)
    hold = h.running.api_request_hold
    assert hold is not None
    put_off: list[bool] = []
    puts_off, holds = hold.puts_off, hold.hold

    def watching(conn: Any, cycle: Any, app: Any) -> bool:
        put_off.append(puts_off(conn, cycle, app))
        return put_off[-1]

    def holding(release: Any) -> None:  # a request put off at the connection's front
        put_off.append(True)
        holds(release)

    hold.puts_off = watching  # type: ignore[method-assign]
    hold.hold = holding  # type: ignore[method-assign]
    assert len(await _pull_then_post(h, second, 2)) == 1
    # its post after its pull is read (no pull due then): the pull is answered at the front,
    # the post served by the protocol it is handed to
    assert put_off == [False]


@pytest.mark.timeout(60)
async def test_a_pull_after_a_pull_on_one_connection_is_served_at_once(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a connection several clients share (a proxy's): another agent's pull is not put off
    h = harness
    first, second = await _two_tickled(h, monkeypatch, pulls_first_s=5)
    conn = await _pulled(h, first, 1)
    try:
        # answered well before the hold's 5 s (the spell still on: the pull ends it)
        status, body = await conn.call(second, "GET", PULL, within_s=2.5)
        assert (status, [e["execution_id"] for e in body["executions"]]) == (200, [2])
        assert h.running.pulls_due.count == 0
    finally:
        conn.close()


_BOTH_AGENTS_HOPS = [
    ("agent_pulled", "pc1"), ("agent_pulled", "pc2"),
    ("agent_tickled", "pc1"), ("agent_tickled", "pc2"),
]  # fmt: skip


def _hops_at_ns(h: TaskServerHarness) -> list[tuple[str, str]]:
    return sorted((e.kind, e.computer) for e in h.ns.events.values() if e.kind.startswith("agent"))


@pytest.mark.timeout(60)
async def test_hop_reports_wait_while_pulls_are_due_and_go_once_none_is(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    first, second = await _two_tickled(h, monkeypatch, pulls_first_s=5)
    cache = h.running.work_cache
    await asyncio.sleep(work_cache.HOP_COMMIT_S * 4)  # past the time they would have waited
    assert cache.uncommitted == 2  # both agents' agent_tickled
    await _tickled_pull(h, first)
    await asyncio.sleep(work_cache.HOP_COMMIT_S * 4)
    assert cache.uncommitted == 3  # and the first agent's agent_pulled
    assert _hops_at_ns(h) == []
    await _tickled_pull(h, second)
    await wait_until(lambda: len(_hops_at_ns(h)) == 4, what="the hop reports at the NS")
    assert _hops_at_ns(h) == _BOTH_AGENTS_HOPS


@pytest.mark.timeout(60)
async def test_hop_reports_wait_for_pulls_due_pulls_first_s_at_most(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    await _two_tickled(h, monkeypatch, pulls_first_s=0.2)
    await wait_until(lambda: len(_hops_at_ns(h)) == 2, what="the hop reports at the NS")
    assert _hops_at_ns(h) == [("agent_tickled", "pc1"), ("agent_tickled", "pc2")]
    assert h.running.pulls_due.count == 2  # forwarded while both pulls are still due


@pytest.mark.timeout(60)
async def test_state_reports_wait_while_pulls_are_due_and_go_once_none_is(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    first, second = await _two_tickled(h, monkeypatch, pulls_first_s=5)
    await _tickled_pull(h, first)  # pc1 answered its tickle: reachable, to be reported
    await asyncio.sleep(state_reporter.COALESCE_S * 2)  # past when it would have gone
    assert [s.name for s in h.ns.states if s.tickle_state == "reachable"] == []
    await _tickled_pull(h, second)
    await wait_until(
        lambda: {s.name for s in h.ns.states if s.tickle_state == "reachable"} == {"pc1", "pc2"},
        what="both agents reported reachable",
    )


def _reachable(h: TaskServerHarness) -> set[str]:
    return {s.name for s in h.ns.states if s.tickle_state == "reachable"}


async def _both_pulled_events_held_at_ns(
    h: TaskServerHarness, monkeypatch: pytest.MonkeyPatch, pulls_first_s: float
) -> asyncio.Event:
    """Two tickled agents pulled (no pull due: their hop reports go to the NS), whose answer
    to event posts waits for the gate returned."""
    first, second = await _two_tickled(h, monkeypatch, pulls_first_s)
    gate = h.ns.events_gate = asyncio.Event()
    await _tickled_pull(h, first)
    await _tickled_pull(h, second)
    return gate


@pytest.mark.timeout(60)
async def test_state_reports_wait_while_the_events_go_to_the_ns_and_go_after_them(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the status events first: the operator waits for them; a fleet's contacts and
    # reachability (a write per agent at the NS) after them
    h = harness
    gate = await _both_pulled_events_held_at_ns(h, monkeypatch, pulls_first_s=5)
    await wait_until(lambda: "events" in h.ns.calls, what="the hop reports on their way")
    await asyncio.sleep(state_reporter.COALESCE_S * 2)  # past when the states would have gone
    assert _reachable(h) == set()
    gate.set()
    await wait_until(lambda: _reachable(h) == {"pc1", "pc2"}, what="both reported reachable")
    assert _hops_at_ns(h) == _BOTH_AGENTS_HOPS


@pytest.mark.timeout(60)
async def test_state_reports_wait_for_the_events_pulls_first_s_at_most(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    gate = await _both_pulled_events_held_at_ns(h, monkeypatch, pulls_first_s=0.5)
    await wait_until(lambda: _reachable(h) == {"pc1", "pc2"}, what="both reported reachable")
    assert _hops_at_ns(h) == []  # the events still on their way: the NS has not answered them
    assert not gate.is_set()


@pytest.mark.timeout(60)
async def test_an_agents_pull_is_answered_at_its_connections_front_and_its_events_after_it(
    harness: TaskServerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the pull without uvicorn's protocol (`tickle.front`); the post after it handed over to it
    handed: list[bytes] = []
    hand_over = AtOnceFront.hand_over

    def watched(self: AtOnceFront, data: bytes, *args: Any, **kwargs: Any) -> Any:
        handed.append(data.partition(b" ")[0])
        return hand_over(self, data, *args, **kwargs)

    monkeypatch.setattr(AtOnceFront, "hand_over", watched)
    h = harness
    first, _ = await _two_tickled(h, monkeypatch, pulls_first_s=0)
    handed.clear()  # the registrations' posts
    conn = await _pulled(h, first, 1)
    try:
        assert handed == []
        status, ack = await conn.call(first, "POST", EVENTS, {"events": [_event(1, "pc1")]})
        assert (status, len(ack["accepted"])) == (200, 1)
        assert handed == [b"POST"]
    finally:
        conn.close()
