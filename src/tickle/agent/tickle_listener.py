"""The agent's tickle listener: a UDP endpoint that turns verified tickles into pulls.

A tickle carries no task: `tasks` makes the agent pull from its task server at once, `settings`
makes it refresh its policy. Every datagram goes through the TickleGuard first; a rejected one is
counted by reason and never causes a pull. Not opened at all in CEM mode.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping

from tickle import wire
from tickle.metrics import ComponentMetrics

log = logging.getLogger(__name__)


class TickleListener(asyncio.DatagramProtocol):
    """Receives datagrams on tickle_host:tickle_port and calls `on_tasks` / `on_settings`."""

    def __init__(
        self,
        keys: Callable[[], Mapping[str, bytes]],
        metrics: ComponentMetrics,
        on_tasks: Callable[[wire.Tickle], None],
        on_settings: Callable[[wire.Tickle], None],
        freshness_s: float = wire.DEFAULT_FRESHNESS_S,
    ) -> None:
        self._keys = keys
        self._metrics = metrics
        self._on_tasks = on_tasks
        self._on_settings = on_settings
        # keys are looked up per datagram: a re-registration rotates them without a restart
        self._guard = wire.TickleGuard(keys=self._key_for, freshness_s=freshness_s)
        self._transport: asyncio.DatagramTransport | None = None
        self.last_tickle_at: float | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Bind the UDP endpoint; return the bound address."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
        self._transport = transport
        sockname = transport.get_extra_info("sockname")
        log.info("tickle listener on %s:%d/udp", sockname[0], sockname[1])
        return str(sockname[0]), int(sockname[1])

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        try:
            tickle = self._guard.check(data)
        except wire.TickleRejected as exc:
            self._metrics.tickles_rejected.labels(reason=exc.reason.value).inc()
            log.info("tickle from %s rejected: %s", addr, exc)
            return
        self._metrics.tickles_received.labels(kind=tickle.kind.name.lower()).inc()
        self.last_tickle_at = time.time()
        log.debug("tickle %s from %s (seq %d)", tickle.kind.name, tickle.sender, tickle.seq)
        if tickle.kind is wire.Kind.TASKS:
            self._on_tasks(tickle)
        else:
            self._on_settings(tickle)

    def error_received(self, exc: Exception) -> None:
        log.debug("tickle listener socket error: %s", exc)

    def _key_for(self, sender: str) -> bytes | None:
        return self._keys().get(sender)
