"""The tickle listener: a UDP endpoint that turns verified tickles into pulls.

Used by the task server (tickles from the NS) and the agent (tickles from its task server). A
tickle carries no task: `tasks` makes the receiver pull its work at once, `settings` makes it pull
its settings. Every datagram goes through the component's `TickleGuard` first; a rejected one is
counted by reason and never causes a pull. The guard keeps its senders' high-water marks in the
component's database (`localdb.HighWaterMarks`), so a replay is rejected after a restart too.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable

from tickle import wire
from tickle.metrics import ComponentMetrics

log = logging.getLogger(__name__)


class TickleListener(asyncio.DatagramProtocol):
    """Checks every datagram with `guard`; a valid tickle calls `on_tasks` or `on_settings`.

    The callbacks run in the event loop's datagram handler: they must not block.
    """

    def __init__(
        self,
        guard: wire.TickleGuard,
        metrics: ComponentMetrics,
        on_tasks: Callable[[], None],
        on_settings: Callable[[], None],
    ) -> None:
        self._guard = guard
        self._metrics = metrics
        self._on = {wire.Kind.TASKS: on_tasks, wire.Kind.SETTINGS: on_settings}
        self._transport: asyncio.DatagramTransport | None = None
        self.last_tickle_at: float | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind the UDP endpoint; return the bound address."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
        self._transport = transport
        sockname = transport.get_extra_info("sockname")
        return str(sockname[0]), int(sockname[1])

    def close(self) -> None:
        """Close the endpoint (safe to call more than once)."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        try:
            tickle = self._guard.check(data)
        except wire.TickleRejected as exc:
            self._metrics.tickles_rejected.labels(reason=exc.reason.value).inc()
            log.info("tickle from %s rejected: %s", addr[0], exc)
            return
        except sqlite3.Error as exc:  # its replay mark was not saved: it must not count
            log.error("tickle from %s dropped, its replay mark not saved: %s", addr[0], exc)
            return
        self._metrics.tickles_received.labels(kind=tickle.kind.name.lower()).inc()
        self.last_tickle_at = time.time()
        log.debug("tickle %s from %s (seq %d)", tickle.kind.name, tickle.sender, tickle.seq)
        self._on[tickle.kind]()

    def error_received(self, exc: Exception) -> None:
        log.debug("tickle listener socket error: %s", exc)
