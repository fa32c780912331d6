"""Confirmed tickles: send, resend with backoff until the target pulls, else declare it unreachable.

Shared by the NS tickle server (tickling task servers) and the task server (tickling its agents).
The pull is the acknowledgement: the component that serves the pull calls `Tickler.ack` *before*
it reads the work, so work created after the ack gets a tickle of its own.

A tickler given a `window` (the task server's, tickling its agents) paces itself by the pulls it
waits for: at most `window` first sends are outstanding (sent, neither acknowledged nor resent
yet), the next waits for an ack; and a resend waits, beyond its backoff delay, while the server
is still serving the pulls queued ahead of its own: its delay counts from the last pull served
(if after its send), plus the time those ahead take at the rate acks came this busy spell; once
they are served, still from the last pull served, for at most the backoff's longest delay more
(agents answer out of order too). So an agent whose pull is still queued is not
tickled again (each resend would bring one more pull to the queue), however slowly or in bursts
the server answers them: a server short of CPU serves its pulls in bursts, and the time between
the acks of one burst says nothing of the queue.

A window may start small (`window_initial`, a slow start): each busy spell opens with that many
places and each ack opens `window_growth` more, up to the window, so the first sends follow the
pulls served instead of going out as one burst.

A window may follow the delay of the pulls instead (`window_target_s`, delay-based as TCP
Vegas / LEDBAT are): it opens with `window_initial` places and keeps what it reached from one
busy spell to the next; each ack measures its tickle's first send → pull time, and how much
longer that took than the quickest (the target's own once it answered before: the agent's own
answer and its wire; else the quickest of any over the last minute or so) is the time the pull
waited behind the others (`queued`). Each ack opens up to `DELAY_GAIN` places more while
`queued` stays under the target (at nothing queued, all of it: the window grows by half with
every round of pulls, so an idle, fast server opens it fully in a few of its quick rounds) and
closes up to one (no send for that ack) as `queued` goes past the target (one at twice the
target), down to the places it opened with: a server that
serves its pulls slowly (just restarted, short of CPU) is sent those, not the whole window. An
ack of a resent tickle measures nothing (which send its pull answers is unknown).

A window may have a gate (`Tickler.gate_window`: the task server's agent API has room for one
more connection beside the pulls the window waits for): while it is shut no first send takes a
place, and the window looks again every `GATE_RECHECK_S`.

A windowed tickler's first send goes without a task of its own (its place in the window, its
pace and its wait for the ack as callbacks on the loop: `make bench-micro`'s tickle_flights
~17 % fewer instructions a flight, half the Python calls), unless a callback is a coroutine
function; a wait for the ack that runs out goes on in the resend loop's task.

A tickler given `PullsDue` counts the pulls its first sends are waiting for (from the request
until the pull, the first resend or the flight's end: a target that did not answer the first
send may be away, and must not keep the count up): the task server serves a fan-out's pulls
before its agents' status events (`WorkCache`, `pulls_first_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

from tickle import wire
from tickle.backoff import Backoff
from tickle.metrics import ComponentMetrics

log = logging.getLogger(__name__)
# a paced sender's sends due within this go together, in one turn of the event loop: their
# hop reports then commit together (the task server's `agent_tickled`: one commit per tickle
# at 2,000/s), and one wake-up serves them all; a send waits at most this much longer
PACE_QUANTUM_S = 0.005

# a delay-based window: the places it opens with (unless told); the most an ack opens (0.5:
# the window grows 1.5 times a round of pulls at most; 1.0, doubling, overshot: a task-server
# restart's requests per second, 2,500 agents, peak / mean 1.90 against 1.25-1.26 at 0.5); how
# long its quickest tickle → pull time of any target holds (a minimum over at least this, at
# most twice)
DELAY_INITIAL = 32
DELAY_GAIN = 0.5
BASE_PERIOD_S = 30.0
# a window whose gate is shut (the server has no room for more pulls) looks again this often
GATE_RECHECK_S = 0.05

Callback = Callable[[str], Awaitable[None] | None]
SentCallback = Callable[[str, wire.Kind, float], Awaitable[None] | None]
ResendCallback = Callable[[str, wire.Kind], Awaitable[None] | None]


class PullsDue:
    """How many first sends of a tickler await their pull (see the module's doc), and a wait
    until none does."""

    def __init__(self) -> None:
        self.count = 0
        self._none = asyncio.Event()
        self._none.set()
        # called with True when a pull becomes due where none was, False when none is again
        self.on_busy: list[Callable[[bool], None]] = []

    def add(self) -> None:
        self.count += 1
        if self.count == 1:
            self._none.clear()
            for callback in self.on_busy:
                callback(True)

    def remove(self) -> None:
        self.count -= 1
        if not self.count:
            self._none.set()
            for callback in self.on_busy:
                callback(False)

    async def none_within(self, within_s: float) -> None:
        """Return once no pull is due, or after `within_s` at most."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                await self._none.wait()


@dataclass(slots=True)
class _InFlight:
    addr: tuple[str, int]
    first_sent: float
    acked: bool = False  # its target pulled
    ack_waiter: asyncio.Future[None] | None = None  # what `_wait_for_ack` awaits, if it does
    again: bool = False
    task: asyncio.Task[None] | None = None
    # the window: the flight's place among the first sends, whether it still holds a place,
    # and what it waits on for one (resolved False if the target pulls meanwhile)
    order: int = 0
    holds: bool = False
    queued: bool = False  # its pull still to come (counted in the queue of those behind it)
    waiter: asyncio.Future[bool] | None = None
    # a delay-based window: its target, when it was first sent (the window's clock), whether
    # it was resent
    target: str = ""
    sent_at: float | None = None
    resent: bool = False
    due: bool = False  # counted in the tickler's `PullsDue`
    announced: bool = False  # `on_sent` called: a send of it left
    # a first send without a task (`Tickler._first`): its kind, what it waits on for a place
    # in the window (called with whether it took one), the timer of its pace or of its wait
    # for the ack, and that wait's state (delays left, last, its start, when the pulls ahead
    # were seen served)
    kind: wire.Kind = wire.Kind.TASKS
    on_place: Callable[[_InFlight, bool], None] | None = None
    timer: asyncio.Handle | None = None
    delays: Iterator[float] | None = None
    last: bool = False
    wait_start: float | None = None
    wait_delay: float = 0.0
    head_at: float | None = None


class _Window:
    """At most `size` first sends outstanding; the others wait, first come first served.

    A busy spell lasts while a first send's pull is due (sent, its flight neither acknowledged nor
    ended). `last_ack` is when this spell's last pull came; `gap_s` the mean time between acks
    over the spell (from its start to its last ack: a mean over bursts and the pauses between
    them, not within one burst), kept from one spell to the next until an ack measures it anew;
    `queue_wait_s` estimates from it how long a flight's own pull waits behind those of the earlier
    first sends not acknowledged yet (resent or not).
    """

    def __init__(
        self,
        size: int,
        initial: int | None = None,
        growth: float = 1.0,
        target_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.size = size
        # delay-based (`target_s`): opens `initial` places once, then follows the pulls' delay
        self.target_s = target_s or None
        # slow start: each busy spell opens `initial` places, and each ack `growth` more, up to
        # `size` (the first sends follow the rate the pulls are served at, not one burst)
        default = DELAY_INITIAL if self.target_s is not None else size
        self.initial = min(size, initial or default)
        self.floor = self.initial  # a delay-based window closes no further than it opened
        self.growth = growth
        self.limit = float(self.initial)
        self.clock = clock  # of the delay-based window's first send → pull times
        self._base_now = math.inf  # the quickest first send → pull time since `_base_since`
        self._base_before = math.inf  # ... in the period before
        self._base_since = clock()
        self._quickest: dict[str, float] = {}  # each target's quickest first send → pull time
        self.outstanding = 0
        self.entered = 0  # first sends ever let through
        self.served = 0  # of those, the flights acknowledged or ended
        self.gap_s = 0.0
        self.last_ack: float | None = None  # monotonic time of this spell's last ack
        self._spell_start = 0.0
        self._spell_acks = 0
        self._waiting: deque[_InFlight] = deque()
        # whether the server has room for one more pull beside those of the first sends
        # outstanding (`Tickler.gate_window`); while it has none, the first sends wait, looked
        # at again every GATE_RECHECK_S
        self.gate: Callable[[int], bool] | None = None
        self._recheck: asyncio.TimerHandle | None = None

    def _open(self) -> bool:
        if self.gate is None or self.gate(self.outstanding):
            return True
        if self._recheck is None:
            loop = asyncio.get_running_loop()
            self._recheck = loop.call_later(GATE_RECHECK_S, self._rechecked)
        return False

    def _rechecked(self) -> None:
        self._recheck = None
        self._release()

    def close(self) -> None:
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None

    async def enter(self, flight: _InFlight) -> bool:
        """Take a place for `flight`'s first send; False if its target pulled while it waited."""
        if self.take_now(flight):
            return True
        flight.waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(flight)
        try:
            return await flight.waiter
        finally:
            flight.waiter = None

    def take_now(self, flight: _InFlight) -> bool:
        """Take a place for `flight`'s first send if one is free and none waits; else False."""
        if self.outstanding < self.limit and not self._waiting and self._open():
            self._take(flight)
            return True
        return False

    def queue(self, flight: _InFlight, on_place: Callable[[_InFlight, bool], None]) -> None:
        """`enter` without a task: `on_place(flight, took)` is called soon (in a turn of its
        own, as a waiting task would wake) once `flight` takes a place (True) or its target
        pulled while it waited (False)."""
        flight.on_place = on_place
        self._waiting.append(flight)

    def leave(self, flight: _InFlight) -> None:
        """`flight` gives its place back (if it holds one): the next waiting send goes."""
        if not flight.holds:
            return
        flight.holds = False
        self.outstanding -= 1
        self._release()

    def _release(self) -> None:
        while self._waiting and self.outstanding < self.limit and self._open():
            nxt = self._waiting.popleft()
            if nxt.waiter is not None and not nxt.waiter.done():
                self._take(nxt)
                nxt.waiter.set_result(True)
            elif nxt.on_place is not None:
                self._take(nxt)
                _placed(nxt, True)

    def acked(self, flight: _InFlight) -> None:
        """A pull acknowledged `flight`: note it in the spell's rate, free its place, and stop
        its wait for one."""
        if flight.queued:
            now = time.monotonic()
            self._spell_acks += 1
            self.last_ack = now
            self.gap_s = (now - self._spell_start) / self._spell_acks
            if self.target_s is not None:
                if flight.sent_at is not None and not flight.resent:
                    self._follow_delay(flight.target, self.clock() - flight.sent_at)
            elif self.limit < self.size:
                self.limit = min(float(self.size), self.limit + self.growth)
                self._release()
        if flight.waiter is not None and not flight.waiter.done():
            flight.waiter.set_result(False)
        elif flight.on_place is not None:
            _placed(flight, False)
        self.end(flight)

    def _follow_delay(self, target: str, took_s: float) -> None:
        """`target`'s pull came `took_s` after its tickle's first send: open up to one place
        more while the pulls wait less than the target beyond the quickest, close up to one
        beyond it. The quickest is the target's own once it answered before (agents far away
        or slow answer slower however idle the server), else the quickest of any."""
        assert self.target_s is not None
        quickest = self._base_s(took_s)
        own = self._quickest.get(target)
        if own is not None:
            quickest = max(quickest, min(own, took_s))
        self._quickest[target] = took_s if own is None else min(own, took_s)
        queued_s = took_s - quickest
        step = max(-1.0, min(DELAY_GAIN, (self.target_s - queued_s) / self.target_s))
        self.limit = min(float(self.size), max(float(self.floor), self.limit + step))
        self._release()

    def _base_s(self, took_s: float) -> float:
        """The quickest first send → pull time of this period and the one before, `took_s`
        included (the minimum moves with the agents and the wire, over a minute or so)."""
        now = self.clock()
        if now - self._base_since >= BASE_PERIOD_S:
            fresh = now - self._base_since < 2 * BASE_PERIOD_S
            self._base_before = self._base_now if fresh else math.inf
            self._base_now = math.inf
            self._base_since = now
        self._base_now = min(self._base_now, took_s)
        return min(self._base_now, self._base_before)

    def end(self, flight: _InFlight) -> None:
        """`flight` was acknowledged or is over: its place and its pull are no longer waited for."""
        if flight.queued:
            flight.queued = False
            self.served += 1
        self.leave(flight)

    def ahead(self, flight: _InFlight) -> int:
        """How many pulls of earlier first sends are still to be served before `flight`'s."""
        return max(0, flight.order - self.served)

    def queue_wait_s(self, flight: _InFlight) -> float:
        """How long the pulls of the first sends ahead of `flight`'s, not yet served, will take:
        at the spell's mean gap between acks (none known yet: no wait)."""
        return self.ahead(flight) * self.gap_s

    def _take(self, flight: _InFlight) -> None:
        if self.entered == self.served:  # no pull due: a new busy spell
            self._spell_start = time.monotonic()
            self._spell_acks = 0
            self.last_ack = None
            if self.target_s is None:  # a delay-based window keeps what the last one reached
                self.limit = float(self.initial)
        flight.holds = True
        flight.queued = True
        flight.order = self.entered
        self.entered += 1
        self.outstanding += 1


class Tickler:
    """Sends tickles from one sender id and tracks their acknowledgement per target and kind."""

    def __init__(
        self,
        sender_id: str,
        key_for: Callable[[str], bytes | None],
        metrics: ComponentMetrics,
        backoff: Backoff | None = None,
        on_unreachable: Callback | None = None,
        on_reachable: Callback | None = None,
        on_sent: SentCallback | None = None,
        rate: float | None = None,
        window: int | None = None,
        reads_after_ack: bool = False,
        window_initial: int | None = None,
        window_growth: float = 1.0,
        window_target_s: float | None = None,
        before_resend: ResendCallback | None = None,
        pulls_due: PullsDue | None = None,
    ) -> None:
        """`rate`: at most this many sends per second (first sends and resends), the rest wait
        their turn; a resend's delay counts from its own send, plus the wait of the sends queued
        then (a sender behind its sends is behind serving their pulls too).

        `window`: at most this many first sends outstanding (see the module's doc); None, as
        the NS tickle server has it, sends at once. `window_initial`: the places a busy spell
        opens with (None: the whole window), and `window_growth` more at each ack.
        `window_target_s` (not None or 0): a delay-based window instead (see the module's doc),
        opening with `window_initial` places (None: `DELAY_INITIAL`).

        `reads_after_ack`: the server reads what the target pulls right after the ack, with
        nothing between (the task server's agent pulls read its cache in memory): a tickle asked
        for before the ack is answered by that pull, and only one asked for after it is sent
        again. Otherwise any tickle asked for during a flight is followed by one more.

        `before_resend`: called when a resend is due, before it goes: a pull the target made
        that reached this sender another way (another process sharing a database) may `ack`
        the flight there, and it is not resent.

        `pulls_due`: counts the first sends awaiting their pull (see the module's doc)."""
        self.sender_id = sender_id
        self._key_for = key_for
        self._metrics = metrics
        self._backoff = backoff or Backoff()
        self._on_unreachable = on_unreachable
        self._on_reachable = on_reachable
        self._on_sent = on_sent
        self._seq = wire.SequenceCounter()
        self._inflight: dict[tuple[str, wire.Kind], _InFlight] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._closed = False
        self._interval = 1.0 / rate if rate else 0.0
        self._next_slot = 0.0  # loop time of the next free send slot
        self._window = (
            _Window(window, window_initial, window_growth, window_target_s) if window else None
        )
        self._reads_after_ack = reads_after_ack
        self._before_resend = before_resend
        self._pulls_due = pulls_due
        # callbacks that are not coroutine functions: a windowed first send goes without a
        # task (`_first`); what one of them returns to await anyway runs as a task of its own
        self._plain = not any(
            inspect.iscoroutinefunction(cb) for cb in (on_sent, on_reachable, on_unreachable)
        )
        self._callback_tasks: set[asyncio.Task[None]] = set()

    @property
    def windowed(self) -> bool:
        """Whether the first sends are paced by a window (`window`)."""
        return self._window is not None

    def gate_window(self, gate: Callable[[int], bool]) -> None:
        """While `gate(outstanding)` is False (the server has no room for one more pull beside
        those of the `outstanding` first sends: its connections are crowded), no first send
        takes a place in the window; resends go on. Needs a window."""
        assert self._window is not None, "a gate is for a window's first sends"
        self._window.gate = gate

    async def start(self, local_addr: tuple[str, int] = ("0.0.0.0", 0)) -> None:
        """Open the sending socket (an ephemeral port unless told otherwise)."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, local_addr=local_addr
        )
        self._transport = transport

    def tickle(self, target: str, addr: tuple[str, int], kind: wire.Kind = wire.Kind.TASKS) -> None:
        """Tickle `target` at `addr` unless a tickle of this kind is already in flight to it."""
        if self._closed:
            return
        current = self._inflight.get((target, kind))
        if current is not None:
            # coalesced: one more tickle follows the ack, unless the pull that acks will see this
            current.again = current.again or current.acked or not self._reads_after_ack
            current.addr = addr
            return
        flight = _InFlight(addr=addr, first_sent=time.time(), target=target, kind=kind)
        self._inflight[(target, kind)] = flight
        if self._pulls_due is not None:
            flight.due = True
            self._pulls_due.add()
        if self._window is not None and self._plain:
            self._first(flight)
        else:
            flight.task = _start(self._deliver(target, kind, flight))

    def readdress(self, target: str, addr: tuple[str, int]) -> None:
        """`target` is now at `addr`: its tickles in flight are resent there."""
        for kind in wire.Kind:
            flight = self._inflight.get((target, kind))
            if flight is not None:
                flight.addr = addr

    def ack(self, target: str, kind: wire.Kind = wire.Kind.TASKS) -> bool:
        """The target pulled: stop resending. Returns whether a tickle was in flight."""
        flight = self._inflight.get((target, kind))
        if flight is None or flight.acked:
            return False
        flight.acked = True
        if flight.ack_waiter is not None:
            _wake(flight.ack_waiter)
        self._undue(flight)
        if self._window is not None:
            self._window.acked(flight)
        # observed here, at the acknowledgement: the resend loop may wake much later under load
        self._metrics.tickle_to_pull.observe(time.time() - flight.first_sent)
        if flight.wait_start is not None and flight.timer is not None:  # `_first`'s wait
            flight.timer.cancel()
            flight.timer = asyncio.get_running_loop().call_soon(self._end, flight)
        return True

    def _undue(self, flight: _InFlight) -> None:
        """`flight`'s pull is no longer due (see the module's doc)."""
        if flight.due and self._pulls_due is not None:
            flight.due = False
            self._pulls_due.remove()

    def in_flight(self, target: str, kind: wire.Kind = wire.Kind.TASKS) -> bool:
        return (target, kind) in self._inflight

    async def close(self) -> None:
        """Stop every resend loop and close the socket."""
        self._closed = True
        for flight in self._inflight.values():
            if flight.task is None:  # a first send without a task: its timer, its count
                if flight.timer is not None:
                    flight.timer.cancel()
                    flight.timer = None
                self._undue(flight)
        tasks = [f.task for f in self._inflight.values() if f.task is not None]
        tasks += self._callback_tasks
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._inflight.clear()
        if self._window is not None:
            self._window.close()
        if self._transport is not None:
            self._transport.close()

    async def _deliver(
        self, target: str, kind: wire.Kind, flight: _InFlight, resumed: bool = False
    ) -> None:
        """`flight`'s sends until its target pulls or the tries run out. `resumed`: its first
        send went without a task (`_first`) and no pull came within that send's wait: on
        from there, with the delays `_first` left."""
        label = kind.name.lower()
        acked = False
        try:
            attempt = 0
            if resumed:
                assert flight.delays is not None
                delays = flight.delays
                stop, attempt = (True, 0) if flight.last else (False, 1)
            else:
                delays = self._backoff.delays()
                stop = False
                if self._window is not None:
                    # False: pulled while waiting for a place in the window
                    acked = not await self._window.enter(flight)
                    flight.first_sent = time.time()
            while not acked and not stop:
                if attempt:
                    await _call(self._before_resend, target, kind)
                if await self._pace() and attempt == 0:
                    flight.first_sent = time.time()  # the send, not the request, starts the clock
                if flight.acked:  # pulled while waiting its turn (another tickle's)
                    acked = True
                    break
                if self._window is not None:
                    if attempt == 0:
                        flight.sent_at = self._window.clock()
                    else:
                        flight.resent = True
                sent = self._send(target, kind, flight.addr)
                if sent and not flight.announced:  # the first send that left (no key: none)
                    flight.announced = True
                    at = flight.first_sent if attempt == 0 else time.time()
                    await _call(self._on_sent, target, kind, at)
                if attempt == 0:
                    self._metrics.tickles_sent_by(label).inc()
                else:
                    self._metrics.tickles_resent_by(label).inc()
                    self._undue(flight)
                    if self._window is not None:
                        self._window.leave(flight)  # maybe lost: it must not hold the window
                delay = next(delays, None)
                if delay is None:
                    # the last try gets as long to answer as the longest gap
                    delay = self._backoff.max_s
                    last = True
                else:
                    last = False
                delay += self._backlog_s()
                if await self._wait_for_ack(flight, delay):
                    acked = True
                    break
                if last:
                    break
                attempt += 1
        finally:
            self._undue(flight)
            if self._window is not None:
                self._window.end(flight)
            if self._inflight.get((target, kind)) is flight:
                del self._inflight[(target, kind)]
            # before any await: a tickle asked for meanwhile joins this follow-up, not a new flight
            if acked and flight.again and not self._closed:
                self.tickle(target, flight.addr, kind)
        if acked:
            await _call(self._on_reachable, target)
        else:
            log.warning("tickle to %s %s: no pull after %d tries", target, flight.addr, attempt + 1)
            self._metrics.tickles_unreachable.inc()
            await _call(self._on_unreachable, target)

    def _ack_deadline(
        self, flight: _InFlight, start: float, delay: float, head_at: float | None
    ) -> tuple[float, float | None]:
        """When `flight`'s wait for its ack, started at `start` for `delay`, ends as things are
        now (see `_wait_for_ack`), and when the pulls ahead of its own were seen served."""
        deadline = start + delay
        if self._window is not None:
            since = max(start, self._window.last_ack or start)
            if self._window.ahead(flight) > 0:
                queued = min(self._window.queue_wait_s(flight), self._backoff.max_s)
                deadline = since + delay + queued
            else:  # its turn came: the pulls ahead arrive out of order too, not for long
                head_at = since if head_at is None else head_at
                deadline = min(since, head_at + self._backoff.max_s) + delay
        return deadline, head_at

    async def _wait_for_ack(self, flight: _InFlight, delay: float) -> bool:
        """Wait `delay`; with a window, not while the server is still serving the pulls queued
        ahead of the flight's own: while some are, the delay counts from the last pull served
        (if after this send), plus the time those queued ahead are expected to take (at most
        the backoff's longest delay); once none is, still from the last pull served, for at most
        the backoff's longest delay more (pulls arrive out of order). Whether it was acked."""
        start = time.monotonic()
        head_at: float | None = None  # when the pulls ahead of its own were seen served
        while True:
            deadline, head_at = self._ack_deadline(flight, start, delay, head_at)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or flight.acked:
                return flight.acked
            # a future the ack or the deadline resolves, where `asyncio.wait_for` on an `Event`
            # made a timeout context and a waiter per wait (a flight's CPU, sent, acked and
            # ended: 53-58 -> 48-55 us in a micro benchmark)
            loop = asyncio.get_running_loop()
            woken = flight.ack_waiter = loop.create_future()
            handle = loop.call_later(remaining, _wake, woken)
            try:
                await woken
            finally:
                handle.cancel()
                flight.ack_waiter = None

    async def _pace(self) -> bool:
        """Wait for this send's slot (no wait without a rate, or when the sender is idle);
        return whether it waited."""
        wake_at = self._slot()
        if wake_at is None:
            return False
        loop = asyncio.get_running_loop()
        woken = loop.create_future()
        handle = loop.call_at(wake_at, _wake, woken)
        try:
            await woken
        finally:
            handle.cancel()
        return True

    def _slot(self) -> float | None:
        """Take this send's slot: None to send now, else the loop time to send at."""
        if not self._interval:
            return None
        now = asyncio.get_running_loop().time()
        slot = max(now, self._next_slot)
        self._next_slot = slot + self._interval
        if slot <= now:
            return None
        # at the quantum's boundary itself (`call_at`): `asyncio.sleep(boundary - now)` added
        # the microseconds between reading `now` and its own read of the clock, so the sends of
        # one quantum were due microseconds apart and woke over two or three turns
        return math.ceil(slot / PACE_QUANTUM_S) * PACE_QUANTUM_S

    # --- a windowed first send without a task ---------------------------------------------------
    # What `_deliver` does up to its first resend, as callbacks on the loop: a run-now's fan-out
    # is thousands of first sends, nearly all answered by a pull, and a task for each (its
    # place in the window, its pace and its wait for the ack each a future awaited) cost the
    # task server far more than its 17 % of a flight's instructions in `make bench-micro`: S5's
    # CPU per agent 488-576 -> 388-540 µs, its pulls/s ~3,500 -> ~5,500, alternated. A wait for
    # the ack that runs out goes on in `_deliver` (`resumed`): the resends are few.

    def _first(self, flight: _InFlight) -> None:
        assert self._window is not None
        if self._window.take_now(flight):
            self._placed(flight, True)
        else:
            self._window.queue(flight, self._placed)

    def _placed(self, flight: _InFlight, took: bool) -> None:
        """`flight` took its place in the window (False: its target pulled while it waited)."""
        if self._closed:
            return
        if not took:
            self._end(flight)
            return
        flight.first_sent = time.time()
        wake_at = self._slot()
        if wake_at is None:
            self._paced(flight, waited=False)
        else:
            loop = asyncio.get_running_loop()
            flight.timer = loop.call_at(wake_at, self._paced, flight)

    def _paced(self, flight: _InFlight, waited: bool = True) -> None:
        """`flight`'s slot came: its first send, then its wait for the ack."""
        flight.timer = None
        if self._closed:
            return
        if waited:
            flight.first_sent = time.time()  # the send, not the request, starts the clock
        if flight.acked:  # pulled while waiting its turn (another tickle's)
            self._end(flight)
            return
        assert self._window is not None
        flight.sent_at = self._window.clock()
        if self._send(flight.target, flight.kind, flight.addr):
            flight.announced = True
            self._call_now(self._on_sent, flight.target, flight.kind, flight.first_sent)
        self._metrics.tickles_sent_by(flight.kind.name.lower()).inc()
        flight.delays = self._backoff.delays()
        delay = next(flight.delays, None)
        if delay is None:  # the last try gets as long to answer as the longest gap
            delay, flight.last = self._backoff.max_s, True
        flight.wait_delay = delay + self._backlog_s()
        flight.wait_start = time.monotonic()
        self._wait(flight)

    def _wait(self, flight: _InFlight) -> None:
        """`_wait_for_ack`'s loop, one turn: a timer until the wait's deadline as things are
        now; at the deadline, `_deliver` goes on (a resend, or the flight's end)."""
        flight.timer = None
        if self._closed or flight.acked:
            return
        assert flight.wait_start is not None
        deadline, flight.head_at = self._ack_deadline(
            flight, flight.wait_start, flight.wait_delay, flight.head_at
        )
        remaining = deadline - time.monotonic()
        if remaining > 0:
            flight.timer = asyncio.get_running_loop().call_later(remaining, self._wait, flight)
            return
        flight.wait_start = None
        flight.task = _start(self._deliver(flight.target, flight.kind, flight, resumed=True))

    def _end(self, flight: _InFlight) -> None:
        """`flight` acknowledged: `_deliver`'s end of an acknowledged flight."""
        flight.timer = None
        if self._closed:
            return
        target, kind = flight.target, flight.kind
        self._undue(flight)
        if self._window is not None:
            self._window.end(flight)
        if self._inflight.get((target, kind)) is flight:
            del self._inflight[(target, kind)]
        if flight.again:
            self.tickle(target, flight.addr, kind)
        self._call_now(self._on_reachable, target)

    def _call_now(self, cb: Callable[..., Awaitable[None] | None] | None, *args: object) -> None:
        """`_call` without a task: what `cb` returns to await runs as a task of its own."""
        if cb is None:
            return
        try:
            result = cb(*args)
        except Exception:
            log.exception("tickle callback failed")
            return
        if result is not None and inspect.isawaitable(result):
            task = _start(_call(lambda: result))
            self._callback_tasks.add(task)
            task.add_done_callback(self._callback_tasks.discard)

    def _backlog_s(self) -> float:
        """How long the sends queued now will take."""
        if not self._interval:
            return 0.0
        return max(0.0, self._next_slot - asyncio.get_running_loop().time())

    def _send(self, target: str, kind: wire.Kind, addr: tuple[str, int]) -> bool:
        """Send one tickle; whether it left (an unroutable address counts as lost on the way:
        it did)."""
        key = self._key_for(target)
        if key is None or self._transport is None:
            log.error("tickle to %s not sent: %s", target, "no key" if key is None else "closed")
            return False
        datagram = wire.encode(kind, self.sender_id, self._seq.next(), key)
        try:
            self._transport.sendto(datagram, addr)
        except OSError as exc:  # unroutable address: counts as a lost datagram
            log.warning("tickle to %s %s failed: %s", target, addr, exc)
        return True


_EAGER = getattr(asyncio, "eager_task_factory", None)  # Python 3.12+


def _start(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """The flight's task, run at once up to its first wait (Python 3.12+): its first send goes
    out now, not after whatever the caller does before it next yields (a run-now's answer was
    serialized and written before its tickle left)."""
    if _EAGER is None:
        return asyncio.create_task(coro)
    task: asyncio.Task[None] = _EAGER(asyncio.get_running_loop(), coro)
    return task


async def _call(cb: Callable[..., Awaitable[None] | None] | None, *args: object) -> None:
    if cb is None:
        return
    try:
        result = cb(*args)
        if result is not None and inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("tickle callback failed")


def _placed(flight: _InFlight, took: bool) -> None:
    """Call `flight.on_place(flight, took)` soon (see `_Window.queue`)."""
    on_place, flight.on_place = flight.on_place, None
    assert on_place is not None
    asyncio.get_running_loop().call_soon(on_place, flight, took)


def _wake(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)
