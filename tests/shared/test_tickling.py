"""Confirmed tickles: resent until pulled, coalesced, and the unreachable are named."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from tickle import tickling as tickling_module
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


Receivers = list[tuple[asyncio.DatagramTransport, Receiver, tuple[str, int]]]


@contextlib.asynccontextmanager
async def tickling(
    n: int, backoff: Backoff, **kwargs: Any
) -> AsyncIterator[tuple[Tickler, Receivers, ComponentMetrics]]:
    """A tickler and `n` receivers, target i (`t{i}`) tickled at receiver i by `tickle_all`."""
    receivers = [await open_receiver() for _ in range(n)]
    metrics = ComponentMetrics("t")
    tickler = Tickler("ns", lambda t: KEY, metrics, backoff, **kwargs)
    await tickler.start(("127.0.0.1", 0))
    try:
        yield tickler, receivers, metrics
    finally:
        await tickler.close()
        for transport, _, _ in receivers:
            transport.close()


def tickle_all(tickler: Tickler, receivers: Receivers) -> None:
    for i, (_, _, addr) in enumerate(receivers):
        tickler.tickle(f"t{i}", addr)


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


async def test_a_resend_first_asks_whether_the_target_pulled_another_way() -> None:
    asked: list[tuple[str, wire.Kind]] = []
    pulled_elsewhere = asyncio.Event()

    def before_resend(target: str, kind: wire.Kind) -> None:
        asked.append((target, kind))
        if pulled_elsewhere.is_set():
            tickler.ack(target, kind)

    async with tickling(1, fast(tries=20), before_resend=before_resend) as (tickler, rx, _):
        (_, receiver, addr) = rx[0]
        tickler.tickle("ts1", addr)
        await asyncio.wait_for(receiver.queue.get(), 2)
        await asyncio.wait_for(receiver.queue.get(), 2)  # no pull seen anywhere: resent
        assert asked == [("ts1", wire.Kind.TASKS)]
        pulled_elsewhere.set()
        async with asyncio.timeout(2):
            while tickler.in_flight("ts1"):
                await asyncio.sleep(0.01)
        assert asked == [("ts1", wire.Kind.TASKS)] * 2  # asked once more, then no resend
        assert receiver.queue.empty()


@pytest.mark.skipif(sys.version_info < (3, 12), reason="eager tasks came with Python 3.12")
async def test_the_first_send_leaves_inside_the_tickle_call_not_when_the_caller_yields() -> None:
    # a run-now's tickle waited for its own answer to be serialized and written first
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        async with tickling(0, fast()) as (tickler, _, _):
            tickler.tickle("ts1", rx.getsockname())
            data = rx.recv(2048)  # no await since: it must be here already
            assert wire.TickleGuard({"ns": KEY}).check(data).kind is wire.Kind.TASKS
            assert tickler.ack("ts1")


# a window's first send goes without a task (`Tickler._first`), its resends in `_deliver`: the
# same tries either way, a single try included
@pytest.mark.parametrize(("window", "tries"), [(None, 3), (4, 3), (4, 1)])
async def test_target_is_declared_unreachable_after_the_last_try(
    window: int | None, tries: int
) -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    unreachable = asyncio.Event()
    due = tickling_module.PullsDue()
    metrics = ComponentMetrics("t")
    tickler = Tickler(
        "ns", lambda t: KEY, metrics, fast(tries=tries), window=window, pulls_due=due,
        on_unreachable=lambda t: unreachable.set(),
    )  # fmt: skip
    await tickler.start(("127.0.0.1", 0))
    try:
        tickler.tickle("ts1", sink.getsockname())
        await asyncio.wait_for(unreachable.wait(), 3)
        assert metrics.tickles_sent.labels(kind="tasks")._value.get() == 1
        assert metrics.tickles_resent.labels(kind="tasks")._value.get() == tries - 1
        assert metrics.tickles_unreachable._value.get() == 1
        assert not tickler.in_flight("ts1")
        assert due.count == 0
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
    backoff = Backoff(base_s=0.5, max_s=1, tries=3, jitter=0)
    async with tickling(20, backoff, rate=50) as (tickler, receivers, metrics):
        arrivals: list[tuple[float, int]] = []
        tickle_all(tickler, receivers)

        async def first(i: int, rx: Receiver) -> None:
            await asyncio.wait_for(rx.queue.get(), 5)
            arrivals.append((time.monotonic(), i))

        await asyncio.gather(*(first(i, rx) for i, (_, rx, _) in enumerate(receivers)))
        assert all(rx.queue.empty() for _, rx, _ in receivers)  # no resend came before
        times = sorted(t for t, _ in arrivals)
        assert times[-1] - times[0] >= 0.3  # 20 sends at 50/s: 0.38 s from first to last
        assert metrics.tickles_resent.labels(kind="tasks")._value.get() == 0  # type: ignore[attr-defined]


async def test_a_paced_tickler_sends_those_due_close_together_in_one_turn_of_the_loop() -> None:
    # each first send reports its hop (the task server's agent_tickled), and the reports of one
    # turn commit together: one send per turn made one commit per tickle
    turns = 0

    def count_turns() -> None:
        nonlocal turns
        turns += 1
        loop.call_soon(count_turns)

    loop = asyncio.get_running_loop()
    sent_in: list[int] = []
    sent_at: list[float] = []

    def sent(*_: object) -> None:
        sent_in.append(turns)
        sent_at.append(loop.time())

    backoff = Backoff(base_s=30, tries=2, jitter=0)  # no resend during the test
    async with tickling(40, backoff, rate=1000, on_sent=sent) as (
        tickler,
        receivers,
        _,
    ):
        loop.call_soon(count_turns)
        tickle_all(tickler, receivers)
        await _first_tickles(receivers, list(range(40)))
        assert len(sent_in) == 40
        # 40 sends at 1,000/s: 40 ms (longer on a loaded machine), sent in one turn per
        # PACE_QUANTUM_S they spanned at most (one turn per send before)
        span_s = max(0.04, sent_at[-1] - sent_at[0])
        assert len(set(sent_in)) <= span_s / tickling_module.PACE_QUANTUM_S + 3, (span_s, sent_in)


async def _first_tickles(receivers: Receivers, which: list[int]) -> None:
    for i in which:
        await asyncio.wait_for(receivers[i][1].queue.get(), 2)


def _sent(metrics: ComponentMetrics) -> float:
    return metrics.tickles_sent.labels(kind="tasks")._value.get()  # type: ignore[attr-defined,no-any-return]


async def test_first_sends_beyond_the_window_wait_for_acks_each_ack_releases_the_next() -> None:
    reachable: list[str] = []
    backoff = Backoff(base_s=30, tries=2, jitter=0)  # no resend during the test
    async with tickling(5, backoff, on_reachable=reachable.append, window=2) as (
        tickler,
        receivers,
        metrics,
    ):
        tickle_all(tickler, receivers)
        await _first_tickles(receivers, [0, 1])
        for _ in range(10):  # the others wait on the window, not on a clock: let them run
            await asyncio.sleep(0)
        assert _sent(metrics) == 2
        assert all(rx.queue.empty() for _, rx, _ in receivers[2:])
        assert tickler.ack("t0")
        await _first_tickles(receivers, [2])  # the ack let the next in line go
        assert receivers[3][1].queue.empty()
        assert receivers[4][1].queue.empty()
        assert tickler.ack("t4")  # pulled on its own while waiting: never tickled
        assert tickler.ack("t1")
        await _first_tickles(receivers, [3])
        async with asyncio.timeout(2):
            while tickler.in_flight("t4"):
                await asyncio.sleep(0.01)
        assert "t4" in reachable
        assert _sent(metrics) == 4
        assert receivers[4][1].queue.empty()


async def test_a_window_that_starts_small_opens_with_each_ack_and_starts_small_again() -> None:
    backoff = Backoff(base_s=30, tries=2, jitter=0)  # no resend during the test
    async with tickling(10, backoff, window=4, window_initial=2, window_growth=1.0) as (
        tickler,
        receivers,
        metrics,
    ):
        for i in range(7):
            tickler.tickle(f"t{i}", receivers[i][2])
        await _first_tickles(receivers, [0, 1])  # the spell opens 2 places, not the 4

        async def settled(sent: int) -> None:
            for _ in range(10):  # the others wait on the window, not on a clock: let them run
                await asyncio.sleep(0)
            assert _sent(metrics) == sent

        await settled(2)
        assert tickler.ack("t0")  # its place back, and one more: two go
        await _first_tickles(receivers, [2, 3])
        await settled(4)
        assert tickler.ack("t1")  # two again: 4 places, the window's size
        await _first_tickles(receivers, [4, 5])
        await settled(6)
        assert tickler.ack("t2")  # no more than the window: one goes
        await _first_tickles(receivers, [6])
        await settled(7)
        for i in range(3, 7):  # every pull served: the spell is over
            assert tickler.ack(f"t{i}")
        async with asyncio.timeout(2):
            while any(tickler.in_flight(f"t{i}") for i in range(7)):
                await asyncio.sleep(0.01)
        for i in range(7, 10):  # the next spell starts small again
            tickler.tickle(f"t{i}", receivers[i][2])
        await _first_tickles(receivers, [7, 8])
        await settled(9)
        assert receivers[9][1].queue.empty()


async def test_a_lost_tickle_does_not_hold_the_window_past_its_first_resend() -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # nobody pulls: the tickle is lost
    sink.bind(("127.0.0.1", 0))
    try:
        async with tickling(1, fast(tries=20), window=1) as (tickler, receivers, metrics):
            tickler.tickle("lost", sink.getsockname())
            tickle_all(tickler, receivers)
            await _first_tickles(receivers, [0])  # sent once the lost one was resent
            assert metrics.tickles_resent.labels(kind="tasks")._value.get() >= 1  # type: ignore[attr-defined]
            assert tickler.in_flight("lost")
    finally:
        sink.close()


async def test_a_resend_waits_for_the_pulls_queued_ahead_of_its_own() -> None:
    backoff = Backoff(base_s=1, max_s=5, tries=3, jitter=0)
    async with tickling(6, backoff, window=10) as (tickler, receivers, _):
        resent: dict[int, float] = {}
        tickle_all(tickler, receivers)
        await _first_tickles(receivers, list(range(6)))
        sent = time.monotonic()
        await asyncio.sleep(0.2)  # the pulls are served slowly: one ack 0.2 s after the sends
        assert tickler.ack("t0")
        await asyncio.sleep(0.2)
        assert tickler.ack("t1")  # the mean time between acks is now about 0.2 s
        # t1 to t5: resent after 1 s, t2 at once, t3 after one more gap (0.2 s) ... t5 after 3

        async def second(i: int) -> None:
            await asyncio.wait_for(receivers[i][1].queue.get(), 10)
            resent[i] = time.monotonic() - sent

        await asyncio.gather(*(second(i) for i in range(2, 6)))
        # without a window every resend comes 1 s after its send; here a flight with pulls
        # queued ahead of its own waits for them: the later in line, the later its resend
        assert resent[2] < resent[3] < resent[4] < resent[5]
        assert resent[5] - resent[2] >= 0.3  # 0.6 s nominally


async def test_without_a_window_every_first_send_goes_at_once() -> None:
    async with tickling(40, Backoff(base_s=30, tries=2)) as (tickler, receivers, metrics):
        tickle_all(tickler, receivers)  # the NS's tickler: no window
        await _first_tickles(receivers, list(range(40)))  # no ack needed for any of them
        assert _sent(metrics) == 40


async def test_pulls_served_in_bursts_do_not_make_the_queued_flights_resend() -> None:
    # a task server short of CPU serves its pulls in bursts: 70 acks in one instant, then none
    # for 0.5 s. Each flight still waiting is behind pulls the server is serving: none is resent
    backoff = Backoff(base_s=1.0, max_s=5, tries=3, jitter=0)
    async with tickling(210, backoff, window=300) as (tickler, receivers, metrics):
        tickle_all(tickler, receivers)
        await _first_tickles(receivers, list(range(210)))
        for burst in range(3):
            await asyncio.sleep(0.2 if burst == 0 else 0.5)
            for i in range(70 * burst, 70 * (burst + 1)):
                assert tickler.ack(f"t{i}")
        assert metrics.tickles_resent.labels(kind="tasks")._value.get() == 0  # type: ignore[attr-defined]
        assert all(rx.queue.empty() for _, rx, _ in receivers)


async def test_a_flight_is_not_resent_while_the_pulls_ahead_of_its_own_are_still_being_served() -> (
    None
):
    # the server serves a pull every 0.1 s, steadily: the 20th waits 2 s for its turn, four
    # times its 0.5 s delay and longer than the backoff's longest delay twice over
    backoff = Backoff(base_s=0.5, max_s=0.5, tries=3, jitter=0)
    async with tickling(20, backoff, window=30) as (tickler, receivers, metrics):
        tickle_all(tickler, receivers)
        await _first_tickles(receivers, list(range(20)))
        for i in range(20):
            await asyncio.sleep(0.1)
            assert tickler.ack(f"t{i}")
        assert metrics.tickles_resent.labels(kind="tasks")._value.get() == 0  # type: ignore[attr-defined]


async def test_a_flight_whose_turn_came_waits_a_while_for_its_pull_among_the_later_ones() -> None:
    # pulls arrive out of order: the first flight's comes after the 15 sent after it, each
    # 0.1 s apart, while the server keeps serving (1.6 s: three times its 0.5 s delay)
    backoff = Backoff(base_s=0.5, max_s=3, tries=3, jitter=0)
    async with tickling(16, backoff, window=30) as (tickler, receivers, metrics):
        tickle_all(tickler, receivers)
        await _first_tickles(receivers, list(range(16)))
        for i in [*range(1, 16), 0]:
            await asyncio.sleep(0.1)
            assert tickler.ack(f"t{i}")
        assert metrics.tickles_resent.labels(kind="tasks")._value.get() == 0  # type: ignore[attr-defined]


async def test_a_tickler_whose_pulls_read_after_the_ack_follows_up_only_what_came_after_it() -> (
    None
):
    # the task server's: work cached before the ack is in the pull that acks (the second work
    # pull of a run re-announces the agents' work: no second tickle and pull each)
    backoff = Backoff(base_s=5, tries=2, jitter=0)
    async with tickling(1, backoff, reads_after_ack=True) as (tickler, receivers, metrics):
        rx, addr = receivers[0][1], receivers[0][2]
        for _ in range(3):
            tickler.tickle("t0", addr)  # before the ack: the pull covers it
        await asyncio.wait_for(rx.queue.get(), 2)
        assert tickler.ack("t0")
        await asyncio.sleep(0.1)
        assert _sent(metrics) == 1
        assert not tickler.in_flight("t0")
        tickler.tickle("t0", addr)
        await asyncio.wait_for(rx.queue.get(), 2)
        assert tickler.ack("t0")
        tickler.tickle("t0", addr)  # after the ack, before its flight ended: one more
        await asyncio.wait_for(rx.queue.get(), 2)
        assert _sent(metrics) == 3


async def test_reading_after_the_ack_a_tickle_asked_for_before_it_brings_no_second_pull() -> None:
    # the task server's tickler: its agents' pulls acknowledge before reading the work, so work
    # tickled while a flight (waiting for its window place, or sent) is not acknowledged yet is
    # read by the pull to come; only work tickled after the ack needs a follow-up tickle
    backoff = Backoff(base_s=5, tries=2, jitter=0)
    async with tickling(2, backoff, window=1, reads_after_ack=True) as (tickler, rx, metrics):
        tickle_all(tickler, rx)  # t0 sent, t1 waits for the window
        await _first_tickles(rx, [0])
        tickle_all(tickler, rx)  # again, before either pull
        assert tickler.ack("t0")
        await _first_tickles(rx, [1])
        async with asyncio.timeout(2):
            while tickler.in_flight("t0"):
                await asyncio.sleep(0.01)
        assert _sent(metrics) == 2  # t0 was not tickled again
        tickler.tickle("t1", rx[1][2])  # before t1's ack: no follow-up either
        assert tickler.ack("t1")
        tickler.tickle("t1", rx[1][2])  # after the ack: work its pull may not have read
        await _first_tickles(rx, [1])
        assert _sent(metrics) == 3
        assert all(r.queue.empty() for _, r, _ in rx)


async def test_pulls_due_counts_each_first_send_until_its_pull() -> None:
    due = tickling_module.PullsDue()
    backoff = Backoff(base_s=30, max_s=30, tries=2, jitter=0)
    # reads_after_ack: a tickle asked for before the pull is answered by it, no follow-up
    async with tickling(2, backoff, pulls_due=due, reads_after_ack=True) as (
        tickler, receivers, _,
    ):  # fmt: skip
        tickle_all(tickler, receivers)
        tickler.tickle("t0", receivers[0][2])  # coalesced: still one flight, one pull due
        assert due.count == 2
        waiting = asyncio.create_task(due.none_within(30))
        assert tickler.ack("t0")
        assert due.count == 1
        await asyncio.sleep(0)
        assert not waiting.done()
        assert not tickler.ack("t0")  # acked once: counted once
        assert tickler.ack("t1")
        assert due.count == 0
        await asyncio.wait_for(waiting, 5)  # the wait ends with the last pull due


async def test_pulls_due_tells_when_the_first_becomes_due_and_when_none_is_any_more() -> None:
    due = tickling_module.PullsDue()
    told: list[bool] = []
    due.on_busy.append(told.append)
    backoff = Backoff(base_s=30, max_s=30, tries=2, jitter=0)
    async with tickling(3, backoff, pulls_due=due) as (tickler, receivers, _):
        tickle_all(tickler, receivers)
        assert told == [True]  # once for the three
        assert tickler.ack("t0")
        assert tickler.ack("t1")
        assert told == [True]
        assert tickler.ack("t2")
        assert told == [True, False]
        async with asyncio.timeout(5):  # its flight ends
            while tickler.in_flight("t0"):
                await asyncio.sleep(0.01)
        tickler.tickle("t0", receivers[0][2])  # a new busy spell
        assert told == [True, False, True]
    assert told == [True, False, True, False]  # the tickler closed: nothing due


async def test_a_lost_tickle_stops_counting_as_a_pull_due_at_its_first_resend() -> None:
    due = tickling_module.PullsDue()
    async with tickling(1, fast(tries=20), pulls_due=due) as (tickler, receivers, _):
        tickle_all(tickler, receivers)
        assert due.count == 1
        rx = receivers[0][1]
        await asyncio.wait_for(rx.queue.get(), 2)
        await asyncio.wait_for(rx.queue.get(), 2)  # resent: it may be lost
        assert due.count == 0
        assert tickler.ack("t0")  # its pull came after all: not counted off twice
        assert due.count == 0


async def test_a_wait_for_no_pull_due_ends_after_its_bound_and_when_the_tickler_closes() -> None:
    due = tickling_module.PullsDue()
    async with tickling(1, Backoff(base_s=30, max_s=30, tries=2, jitter=0), pulls_due=due) as (
        tickler, receivers, _,
    ):  # fmt: skip
        tickle_all(tickler, receivers)
        await asyncio.wait_for(due.none_within(0.05), 5)  # bounded: the pull is still due
        assert due.count == 1
        waiting = asyncio.create_task(due.none_within(30))
        await tickler.close()
        await asyncio.wait_for(waiting, 5)
        assert due.count == 0


async def test_a_tickle_that_never_left_is_not_reported_sent_and_one_that_left_later_is() -> None:
    transport, rx, addr = await open_receiver()
    keys: dict[str, bytes | None] = {"nokey": None, "later": None}
    sent: list[tuple[str, float]] = []
    unreachable: list[str] = []

    def on_sent(target: str, kind: wire.Kind, at: float) -> None:
        sent.append((target, at))

    tickler = Tickler("ns", keys.get, ComponentMetrics("t"), fast(tries=3),
                      on_sent=on_sent, on_unreachable=unreachable.append)  # fmt: skip
    await tickler.start(("127.0.0.1", 0))
    try:
        tickler.tickle("nokey", addr)
        tickler.tickle("later", addr)
        keys["later"] = KEY  # its resends find a key: the first of them leaves
        await asyncio.wait_for(rx.queue.get(), 2)
        assert [target for target, _ in sent] == ["later"]
        async with asyncio.timeout(5):
            while "nokey" not in unreachable:
                await asyncio.sleep(0.01)
        assert [target for target, _ in sent] == ["later"]  # never: no tickle of it left
    finally:
        await tickler.close()
        transport.close()


async def test_while_the_server_has_no_room_no_first_send_goes_and_they_go_once_it_has() -> None:
    backoff = Backoff(base_s=30, tries=2, jitter=0)  # no resend during the test
    room = {"left": 2}  # connections the server has room for
    asked: list[int] = []

    def gate(outstanding: int) -> bool:
        asked.append(outstanding)
        return outstanding < room["left"]

    async with tickling(4, backoff, window=10) as (tickler, receivers, metrics):
        tickler.gate_window(gate)
        tickle_all(tickler, receivers)
        await _first_tickles(receivers, [0, 1])
        assert asked[:3] == [0, 1, 2]  # each asked beside the first sends outstanding
        async with asyncio.timeout(5):  # the gate looked at again while it is shut
            while len(asked) < 6:
                await asyncio.sleep(0.01)
        assert _sent(metrics) == 2
        assert receivers[2][1].queue.empty()
        room["left"] = 4  # room made (connections closed): the others go, in order
        await _first_tickles(receivers, [2, 3])
        assert _sent(metrics) == 4


async def test_closing_a_windowed_tickler_ends_its_first_sends_wherever_they_wait() -> None:
    # one waits for its ack, one for its pace slot, one for a place in the window: none is
    # sent or reported after the close, and no pull is due any more
    due = tickling_module.PullsDue()
    sent: list[str] = []
    reachable: list[str] = []
    backoff = Backoff(base_s=30, tries=2, jitter=0)
    async with tickling(
        3, backoff, window=2, rate=0.01, pulls_due=due, on_reachable=reachable.append,
        on_sent=lambda target, kind, at: sent.append(target),
    ) as (tickler, receivers, _):  # fmt: skip
        tickle_all(tickler, receivers)
        await _first_tickles(receivers, [0])  # t1 waits 100 s for its slot, t2 for a place
        assert due.count == 3
        await tickler.close()
        assert due.count == 0
        assert tickler.ack("t0") is False  # over
        await asyncio.sleep(0)
        assert sent == ["t0"]
        assert reachable == []
        assert all(rx.queue.empty() for _, rx, _ in receivers)


async def test_a_windowed_tickler_awaits_what_its_callbacks_return() -> None:
    # coroutine functions take the path with a task; a plain one returning an awaitable has it
    # awaited in a task of its own
    plain_done: list[str] = []
    coro_done: list[str] = []

    def plain(target: str) -> Awaitable[None]:
        async def later() -> None:
            plain_done.append(target)

        return later()

    async def coroutine(target: str) -> None:
        coro_done.append(target)

    backoff = Backoff(base_s=30, tries=2, jitter=0)
    for on_reachable, done in ((plain, plain_done), (coroutine, coro_done)):
        async with tickling(2, backoff, window=4, on_reachable=on_reachable) as (
            tickler, receivers, _,
        ):  # fmt: skip
            tickle_all(tickler, receivers)
            await _first_tickles(receivers, [0, 1])
            assert tickler.ack("t0")
            assert tickler.ack("t1")
            async with asyncio.timeout(2):
                while len(done) < 2:
                    await asyncio.sleep(0.01)
            assert sorted(done) == ["t0", "t1"]
