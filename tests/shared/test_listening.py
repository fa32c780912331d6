"""The shared tickle listener over real UDP on loopback: what reaches a pull, and what is logged."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from tests.shared.test_wire import KEY, KEYS, Unwritable
from tickle import wire
from tickle.listening import TickleListener
from tickle.metrics import ComponentMetrics

pytestmark = pytest.mark.timeout(30)


@dataclass
class Receiver:
    """A listener on loopback, the pulls it caused, and a socket that sends to it."""

    listener: TickleListener
    metrics: ComponentMetrics
    addr: tuple[str, int]
    pulls: list[str] = field(default_factory=list)
    sock: socket.socket = field(default_factory=lambda: socket.socket(type=socket.SOCK_DGRAM))
    _seq: wire.SequenceCounter = field(default_factory=wire.SequenceCounter)

    def send(self, datagram: bytes) -> None:
        self.sock.sendto(datagram, self.addr)

    def valid(self, key: bytes = KEY) -> bytes:
        return wire.encode(wire.Kind.TASKS, "ns", self._seq.next(), key)

    def rejected(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "tickle_tickles_rejected_total", {"reason": reason}
        )
        return float(value or 0.0)


async def until(condition: Callable[[], object], what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


StartReceiver = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def receiver_with() -> AsyncIterator[StartReceiver]:
    """Starts listeners with a guard (and listener options); closes them at the end."""
    started: list[Receiver] = []

    async def start(guard: wire.TickleGuard, **kw: float) -> Receiver:
        metrics = ComponentMetrics("test")
        pulls: list[str] = []
        listener = TickleListener(
            guard, metrics, lambda: pulls.append("tasks"), lambda: pulls.append("settings"), **kw
        )
        addr = await listener.start("127.0.0.1", 0)
        started.append(Receiver(listener, metrics, addr, pulls))
        return started[-1]

    yield start
    for r in started:
        r.listener.close()
        r.sock.close()


async def test_a_tickle_whose_replay_mark_cannot_be_saved_causes_no_pull(
    receiver_with: StartReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    r = await receiver_with(wire.TickleGuard(KEYS, marks=Unwritable()))
    r.send(r.valid())
    await until(lambda: "replay mark not saved" in caplog.text, "the error to be logged")
    assert r.pulls == []
    assert caplog.records[-1].levelno == logging.ERROR
