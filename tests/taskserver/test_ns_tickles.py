"""NS tickles at the task server: a valid one pulls at once; a rejected one never does."""

from __future__ import annotations

import logging
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.taskserver.conftest import FakeNs, TaskServerHarness, wait_until, work_for
from tickle import wire


async def metric(h: TaskServerHarness, name: str, **labels: str) -> float:
    """One sample of the TS's /metrics (0 when absent)."""
    status, text = await h.call(None, "GET", "/metrics")
    assert status == 200
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


async def test_valid_ns_tickle_pulls_work_at_once_and_tickles_the_agent(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    pulls = h.ns.count("work")
    h.ns.work = [work_for(1, "pc1")]

    sent = time.monotonic()
    h.send_tickle(h.ns.tickle())
    await wait_until(lambda: h.ns.count("work") > pulls, within_s=2, what="a work pull")
    await wait_until(lambda: agent.socket.datagrams, within_s=2, what="the agent's tickle")
    assert time.monotonic() - sent < 1.0  # at once, not at the next periodic check

    tickles = agent.tickles("ts1")  # verified with the agent's key, as sent by "ts1"
    assert tickles[0].kind is wire.Kind.TASKS
    assert await metric(h, "tickle_tickles_received_total", kind="tasks") == 1
    # the NS timeline learns that the agent was tickled
    await wait_until(lambda: h.ns.events_of("agent_tickled"), what="agent_tickled event")
    (event,) = h.ns.events_of("agent_tickled")
    assert (event.execution_id, event.computer) == (1, "pc1")


@pytest.mark.parametrize(
    ("reason", "make"),
    [
        ("bad_mac", lambda ns: ns.tickle(key=b"forged-key-0123456789abcdef01234")),
        ("bad_mac", lambda ns: _altered(ns.tickle())),
        ("unknown_sender", lambda ns: ns.tickle(sender="mallory")),
        ("stale", lambda ns: ns.tickle(sent_at_ms=int((time.time() - 120) * 1000))),
        ("malformed", lambda ns: b"TKL\x01garbage"),
        ("malformed", lambda ns: b"\x00" * 600),
        ("unknown_kind", lambda ns: _kind(ns, 9)),
    ],
    ids=["forged", "altered", "unknown-sender", "stale", "truncated", "oversized", "bad-kind"],
)
async def test_rejected_tickle_is_counted_by_reason_and_causes_no_pull(
    task_server: TaskServerHarness, reason: str, make: object
) -> None:
    h = task_server
    agent = await h.register_agent("pc1")
    h.ns.work = [work_for(1, "pc1")]
    pulls = h.ns.count("work")

    assert callable(make)
    h.send_tickle(make(h.ns))
    await wait_until(
        lambda: _sample(h, reason), within_s=2, what=f"the {reason} rejection to be counted"
    )
    assert await metric(h, "tickle_tickles_rejected_total", reason=reason) == 1
    assert h.ns.count("work") == pulls
    assert agent.socket.datagrams == []
    assert await metric(h, "tickle_tickles_received_total", kind="tasks") == 0


async def test_replayed_tickle_is_rejected_and_pulls_only_once(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    pulls = h.ns.count("work")
    datagram = h.ns.tickle()
    h.send_tickle(datagram)
    await wait_until(lambda: h.ns.count("work") == pulls + 1, what="the first pull")
    h.send_tickle(datagram)
    await wait_until(lambda: _sample(h, "replayed"), what="the replay to be counted")
    assert await metric(h, "tickle_tickles_rejected_total", reason="replayed") == 1
    assert h.ns.count("work") == pulls + 1


async def test_replayed_tickle_is_rejected_after_the_task_server_restarts(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    datagram = h.ns.tickle()
    h.send_tickle(datagram)
    await wait_until(lambda: h.ns.vias("work").count("tickle") == 1, what="the tickled pull")
    await h.stop()
    await h.start()  # on the same state dir
    await wait_until(lambda: h.ns.vias("work").count("start") == 2, what="the pull at restart")

    h.send_tickle(datagram)
    await wait_until(lambda: _sample(h, "replayed"), what="the replay to be counted")
    # a restarted NS: its sequence starts anew, higher
    h.send_tickle(h.ns.tickle(seq=wire.SequenceCounter().next()))
    await wait_until(lambda: h.ns.vias("work").count("tickle") == 2, what="the new tickle's pull")
    assert await metric(h, "tickle_tickles_rejected_total", reason="replayed") == 1
    assert await metric(h, "tickle_tickles_received_total", kind="tasks") == 1


async def test_burst_of_tickles_is_coalesced_into_at_most_two_pulls(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    h.ns.work_delay_s = 0.5  # the whole burst arrives while the first pull runs
    pulls = h.ns.count("work")
    for _ in range(20):
        h.send_tickle(h.ns.tickle())
    await wait_until(
        lambda: h.running.metrics.tickles_received.labels(kind="tasks")._value.get() == 20,
        what="all 20 tickles received",
    )
    assert _pulling(h)
    await wait_until(lambda: not _pulling(h), what="pulls to end")
    assert h.ns.count("work") - pulls == 2  # the one running, and one more after it


def _sample(h: TaskServerHarness, reason: str) -> bool:
    return bool(h.running.metrics.tickles_rejected.labels(reason=reason)._value.get())


def _pulling(h: TaskServerHarness) -> bool:
    task = h.running.sync.work._task
    return task is not None and not task.done()


def _altered(datagram: bytes) -> bytes:
    # change the sequence number's last byte: the MAC no longer matches
    pos = len(datagram) - wire.MAC_LEN - 9
    return datagram[:pos] + bytes([datagram[pos] ^ 1]) + datagram[pos + 1 :]


def _kind(ns: object, kind: int) -> bytes:
    import hashlib
    import hmac

    from tests.taskserver.conftest import FakeNs

    assert isinstance(ns, FakeNs)
    good = ns.tickle()
    body = good[:4] + bytes([kind]) + good[5 : -wire.MAC_LEN]
    return body + hmac.new(ns.tickle_key, body, hashlib.sha256).digest()


async def test_task_server_60s_ahead_of_the_ns_says_once_that_its_clock_is_off(
    fake_ns: FakeNs, harness: TaskServerHarness, caplog: pytest.LogCaptureFixture
) -> None:
    fake_ns.clock_offset_s = -60.0  # the NS's clock a minute behind: ours a minute ahead
    h = harness
    await h.start()
    assert h.running.ns.clock_offset_s == pytest.approx(60, abs=1)
    with caplog.at_level(logging.WARNING, logger="tickle.taskserver.service"):
        for _ in range(3):  # sent now by the NS's clock: a minute old by ours
            h.send_tickle(fake_ns.tickle(sent_at_ms=int((time.time() - 60) * 1000)))
        await wait_until(
            lambda: h.running.metrics.registry.get_sample_value(
                "tickle_tickles_rejected_total", {"reason": "stale"}
            ) == 3,
            what="3 stale tickles",
        )  # fmt: skip
    lines = [r.getMessage() for r in caplog.records if "clock is" in r.getMessage()]
    assert len(lines) == 1, lines  # once, not per tickle
    assert "clock is +60." in lines[0]
    assert "the notification server's" in lines[0]
