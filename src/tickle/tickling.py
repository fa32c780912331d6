"""Confirmed tickles: send, resend with backoff until the target pulls, else declare it unreachable.

Shared by the NS tickle server (tickling task servers) and the task server (tickling its agents).
The pull is the acknowledgement: the component that serves the pull calls `Tickler.ack` *before*
it reads the work, so work created after the ack gets a tickle of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tickle import wire
from tickle.backoff import Backoff
from tickle.metrics import ComponentMetrics

log = logging.getLogger(__name__)

Callback = Callable[[str], Awaitable[None] | None]
SentCallback = Callable[[str, wire.Kind, float], Awaitable[None] | None]


@dataclass
class _InFlight:
    addr: tuple[str, int]
    first_sent: float
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    again: bool = False
    task: asyncio.Task[None] | None = None


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
    ) -> None:
        """`rate`: at most this many sends per second (first sends and resends), the rest wait
        their turn; a resend's delay counts from its own send, plus the wait of the sends queued
        then (a sender behind its sends is behind serving their pulls too)."""
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
            current.again = True  # coalesced: one more tickle follows the ack
            current.addr = addr
            return
        flight = _InFlight(addr=addr, first_sent=time.time())
        self._inflight[(target, kind)] = flight
        flight.task = asyncio.create_task(self._deliver(target, kind, flight))

    def readdress(self, target: str, addr: tuple[str, int]) -> None:
        """`target` is now at `addr`: its tickles in flight are resent there."""
        for kind in wire.Kind:
            flight = self._inflight.get((target, kind))
            if flight is not None:
                flight.addr = addr

    def ack(self, target: str, kind: wire.Kind = wire.Kind.TASKS) -> bool:
        """The target pulled: stop resending. Returns whether a tickle was in flight."""
        flight = self._inflight.get((target, kind))
        if flight is None or flight.acked.is_set():
            return False
        flight.acked.set()
        # observed here, at the acknowledgement: the resend loop may wake much later under load
        self._metrics.tickle_to_pull.observe(time.time() - flight.first_sent)
        return True

    def in_flight(self, target: str, kind: wire.Kind = wire.Kind.TASKS) -> bool:
        return (target, kind) in self._inflight

    async def close(self) -> None:
        """Stop every resend loop and close the socket."""
        self._closed = True
        tasks = [f.task for f in self._inflight.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._inflight.clear()
        if self._transport is not None:
            self._transport.close()

    async def _deliver(self, target: str, kind: wire.Kind, flight: _InFlight) -> None:
        label = kind.name.lower()
        acked = False
        try:
            delays = self._backoff.delays()
            attempt = 0
            while True:
                if await self._pace() and attempt == 0:
                    flight.first_sent = time.time()  # the send, not the request, starts the clock
                if flight.acked.is_set():  # pulled while waiting its turn (another tickle's)
                    acked = True
                    break
                self._send(target, kind, flight.addr)
                if attempt == 0:
                    self._metrics.tickles_sent.labels(kind=label).inc()
                    await _call(self._on_sent, target, kind, flight.first_sent)
                else:
                    self._metrics.tickles_resent.labels(kind=label).inc()
                delay = next(delays, None)
                if delay is None:
                    # the last try gets as long to answer as the longest gap
                    delay = self._backoff.max_s
                    last = True
                else:
                    last = False
                delay += self._backlog_s()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(flight.acked.wait(), delay)
                if flight.acked.is_set():
                    acked = True
                    break
                if last:
                    break
                attempt += 1
        finally:
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

    async def _pace(self) -> bool:
        """Wait for this send's slot (no wait without a rate, or when the sender is idle);
        return whether it waited."""
        if not self._interval:
            return False
        now = asyncio.get_running_loop().time()
        slot = max(now, self._next_slot)
        self._next_slot = slot + self._interval
        if slot <= now:
            return False
        await asyncio.sleep(slot - now)
        return True

    def _backlog_s(self) -> float:
        """How long the sends queued now will take."""
        if not self._interval:
            return 0.0
        return max(0.0, self._next_slot - asyncio.get_running_loop().time())

    def _send(self, target: str, kind: wire.Kind, addr: tuple[str, int]) -> None:
        key = self._key_for(target)
        if key is None or self._transport is None:
            log.error("tickle to %s not sent: %s", target, "no key" if key is None else "closed")
            return
        datagram = wire.encode(kind, self.sender_id, self._seq.next(), key)
        try:
            self._transport.sendto(datagram, addr)
        except OSError as exc:  # unroutable address: counts as a lost datagram
            log.warning("tickle to %s %s failed: %s", target, addr, exc)


async def _call(cb: Callable[..., Awaitable[None] | None] | None, *args: object) -> None:
    if cb is None:
        return
    try:
        result = cb(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("tickle callback failed")
