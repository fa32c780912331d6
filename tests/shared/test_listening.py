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
    said = [r for r in caplog.records if "replay mark not saved" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.ERROR]


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tickle.listening"]


def forged(r: Receiver, n: int) -> None:
    for _ in range(n):
        r.send(r.valid(key=b"f" * 32))


async def test_a_flood_is_logged_once_at_once_then_summed_up_in_one_line_per_interval(
    receiver_with: StartReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tickle.listening")
    r = await receiver_with(wire.TickleGuard(KEYS), log_interval_s=0.5)
    forged(r, 100)  # well inside the socket's receive buffer
    await until(lambda: r.rejected("bad_mac") == 100, "100 rejections counted")
    assert len(lines(caplog)) == 1
    assert lines(caplog)[0].startswith("tickle from 127.0.0.1 rejected: bad_mac: authenticator")

    await until(lambda: len(lines(caplog)) == 2, "the summing-up line")
    assert lines(caplog)[1].startswith("99 more tickles rejected as bad_mac since ")
    assert "(the last from 127.0.0.1: authenticator mismatch from 'ns')" in lines(caplog)[1]
    forged(r, 20)  # the flood goes on: the next line sums these up
    await until(lambda: len(lines(caplog)) == 3, "the next summing-up line")
    assert lines(caplog)[2].startswith("20 more tickles rejected as bad_mac since ")
    assert r.rejected("bad_mac") == 120
    assert r.pulls == []


async def test_after_a_quiet_interval_the_next_rejection_is_logged_at_once(
    receiver_with: StartReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tickle.listening")
    r = await receiver_with(wire.TickleGuard(KEYS), log_interval_s=0.2)
    forged(r, 1)
    await until(lambda: r.rejected("bad_mac") == 1, "the rejection counted")
    await asyncio.sleep(0.5)  # an interval with nothing to sum up: no line
    assert len(lines(caplog)) == 1
    forged(r, 1)
    await until(lambda: len(lines(caplog)) == 2, "the next rejection logged")
    assert lines(caplog)[1].startswith("tickle from 127.0.0.1 rejected: bad_mac")


async def test_each_reason_is_logged_at_once_on_its_own(
    receiver_with: StartReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tickle.listening")
    r = await receiver_with(wire.TickleGuard(KEYS))
    forged(r, 5)
    for _ in range(5):
        r.send(b"garbage")
    await until(lambda: r.rejected("malformed") == 5, "the malformed ones counted")
    await until(lambda: r.rejected("bad_mac") == 5, "the forged ones counted")
    assert sorted(line.split(": ")[1] for line in lines(caplog)) == ["bad_mac", "malformed"]


async def test_closing_the_listener_writes_what_was_only_counted(
    receiver_with: StartReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tickle.listening")
    r = await receiver_with(wire.TickleGuard(KEYS))  # the default interval: a minute
    forged(r, 50)
    await until(lambda: r.rejected("bad_mac") == 50, "50 rejections counted")
    r.listener.close()
    r.listener.close()
    assert [line.split(" since ")[0] for line in lines(caplog)[1:]] == [
        "49 more tickles rejected as bad_mac"
    ]
