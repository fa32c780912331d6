"""Confirmed tickles: resent until pulled, coalesced, and the unreachable are named."""

from __future__ import annotations

import asyncio
import socket
import time

from tickle import wire
from tickle.backoff import Backoff
from tickle.metrics import ComponentMetrics
from tickle.tickling import Tickler

KEY = b"q" * 32


class Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[wire.Tickle] = asyncio.Queue()
        self.guard = wire.TickleGuard({"ns": KEY})

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(self.guard.check(data))


async def open_receiver() -> tuple[asyncio.DatagramTransport, Receiver, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Receiver, local_addr=("127.0.0.1", 0))
    return transport, proto, transport.get_extra_info("sockname")


def fast(tries: int = 4) -> Backoff:
    return Backoff(base_s=0.05, factor=2, max_s=0.1, tries=tries, jitter=0)


async def test_tickle_is_resent_until_acked_then_stops() -> None:
    transport, rx, addr = await open_receiver()
    reachable: list[str] = []
    metrics = ComponentMetrics("t")
    tickler = Tickler("ns", lambda t: KEY, metrics, fast(tries=20), on_reachable=reachable.append)
    await tickler.start(("127.0.0.1", 0))
    try:
        tickler.tickle("ts1", addr)
        first = await asyncio.wait_for(rx.queue.get(), 2)
        second = await asyncio.wait_for(rx.queue.get(), 2)  # no pull yet: resent
        assert second.seq > first.seq
        assert tickler.ack("ts1")
        async with asyncio.timeout(2):
            while tickler.in_flight("ts1"):
                await asyncio.sleep(0.01)
        assert reachable == ["ts1"]
        while not rx.queue.empty():
            rx.queue.get_nowait()
        await asyncio.sleep(0.3)  # three resend periods: nothing more may arrive after the ack
        assert rx.queue.empty()
    finally:
        await tickler.close()
        transport.close()


async def test_target_is_declared_unreachable_after_the_last_try() -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    unreachable = asyncio.Event()
    metrics = ComponentMetrics("t")
    tickler = Tickler(
        "ns", lambda t: KEY, metrics, fast(tries=3), on_unreachable=lambda t: unreachable.set()
    )
    await tickler.start(("127.0.0.1", 0))
    try:
        tickler.tickle("ts1", sink.getsockname())
        await asyncio.wait_for(unreachable.wait(), 3)
        assert metrics.tickles_sent.labels(kind="tasks")._value.get() == 1
        assert metrics.tickles_resent.labels(kind="tasks")._value.get() == 2
        assert metrics.tickles_unreachable._value.get() == 1
    finally:
        await tickler.close()
        sink.close()


async def test_burst_is_coalesced_and_followed_by_one_more_after_the_ack() -> None:
    transport, rx, addr = await open_receiver()
    metrics = ComponentMetrics("t")
    tickler = Tickler("ns", lambda t: KEY, metrics, Backoff(base_s=5, tries=2, jitter=0))
    await tickler.start(("127.0.0.1", 0))
    try:
        for _ in range(100):
            tickler.tickle("ts1", addr)
        await asyncio.wait_for(rx.queue.get(), 2)
        assert metrics.tickles_sent.labels(kind="tasks")._value.get() == 1
        tickler.ack("ts1")
        await asyncio.wait_for(rx.queue.get(), 2)  # work asked for during the flight
        assert metrics.tickles_sent.labels(kind="tasks")._value.get() == 2
    finally:
        await tickler.close()
        transport.close()


async def test_kinds_are_tracked_apart() -> None:
    transport, rx, addr = await open_receiver()
    tickler = Tickler("ns", lambda t: KEY, ComponentMetrics("t"), Backoff(base_s=5, tries=2))
    await tickler.start(("127.0.0.1", 0))
    try:
        tickler.tickle("ts1", addr, wire.Kind.TASKS)
        tickler.tickle("ts1", addr, wire.Kind.SETTINGS)
        kinds = {(await asyncio.wait_for(rx.queue.get(), 2)).kind for _ in range(2)}
        assert kinds == {wire.Kind.TASKS, wire.Kind.SETTINGS}
        assert tickler.ack("ts1", wire.Kind.SETTINGS)
        assert tickler.in_flight("ts1", wire.Kind.TASKS)
    finally:
        await tickler.close()
        transport.close()


def test_backoff_schedule_is_bounded_and_capped() -> None:
    b = Backoff(base_s=0.5, factor=2, max_s=8, tries=6, jitter=0)
    assert list(b.delays()) == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert b.total_s() == 0.5 + 1 + 2 + 4 + 8 + 8


async def test_tickle_to_pull_is_measured_at_the_acknowledgement() -> None:
    transport, rx, addr = await open_receiver()
    metrics = ComponentMetrics("t")
    tickler = Tickler("ns", lambda t: KEY, metrics, fast(tries=20))
    await tickler.start(("127.0.0.1", 0))
    try:
        tickler.tickle("ts1", addr)
        await asyncio.wait_for(rx.queue.get(), 2)
        assert tickler.ack("ts1")
        time.sleep(0.5)  # noqa: ASYNC251 - a loaded event loop: the resend loop wakes late
        async with asyncio.timeout(2):
            while tickler.in_flight("ts1"):
                await asyncio.sleep(0.01)
        assert metrics.tickle_to_pull._sum.get() < 0.4  # type: ignore[attr-defined]
        assert _count(metrics) == 1
    finally:
        await tickler.close()
        transport.close()


def _count(metrics: ComponentMetrics) -> float:
    (family,) = [f for f in metrics.registry.collect() if f.name == "tickle_tickle_to_pull_seconds"]
    return next(s.value for s in family.samples if s.name.endswith("_count"))


async def test_a_paced_tickler_spreads_its_sends_and_resends_after_the_queued_first_sends() -> None:
    receivers = [await open_receiver() for _ in range(20)]
    metrics = ComponentMetrics("t")
    backoff = Backoff(base_s=0.5, max_s=1, tries=3, jitter=0)
    tickler = Tickler("ns", lambda t: KEY, metrics, backoff, rate=50)
    await tickler.start(("127.0.0.1", 0))
    arrivals: list[tuple[float, int]] = []
    try:
        for i, (_, _, addr) in enumerate(receivers):
            tickler.tickle(f"t{i}", addr)

        async def first(i: int, rx: Receiver) -> None:
            await asyncio.wait_for(rx.queue.get(), 5)
            arrivals.append((time.monotonic(), i))

        await asyncio.gather(*(first(i, rx) for i, (_, rx, _) in enumerate(receivers)))
        assert all(rx.queue.empty() for _, rx, _ in receivers)  # no resend came before
        times = sorted(t for t, _ in arrivals)
        assert times[-1] - times[0] >= 0.3  # 20 sends at 50/s: 0.38 s from first to last
        assert metrics.tickles_resent.labels(kind="tasks")._value.get() == 0  # type: ignore[attr-defined]
    finally:
        await tickler.close()
        for transport, _, _ in receivers:
            transport.close()
