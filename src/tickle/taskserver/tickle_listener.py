"""The task server's tickle listener: NS tickles on UDP, authenticated before anything is pulled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from tickle import wire
from tickle.metrics import ComponentMetrics

log = logging.getLogger(__name__)


async def start_tickle_listener(
    host: str,
    port: int,
    guard: wire.TickleGuard,
    metrics: ComponentMetrics,
    on_tasks: Callable[[], None],
    on_settings: Callable[[], None],
) -> asyncio.DatagramTransport:
    """Bind the UDP endpoint; valid tickles call `on_tasks` / `on_settings` (must not block)."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: TickleListener(guard, metrics, on_tasks, on_settings), local_addr=(host, port)
    )
    return transport


class TickleListener(asyncio.DatagramProtocol):
    """Checks every datagram with the guard; only a verified, fresh, first-seen one triggers."""

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

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        try:
            tickle = self._guard.check(data)
        except wire.TickleRejected as exc:
            self._metrics.tickles_rejected.labels(reason=exc.reason.value).inc()
            log.info("tickle from %s rejected: %s", addr[0], exc)
            return
        self._metrics.tickles_received.labels(kind=tickle.kind.name.lower()).inc()
        log.debug("tickle %s from %s (seq %d)", tickle.kind.name, tickle.sender, tickle.seq)
        self._on[tickle.kind]()

    def error_received(self, exc: Exception) -> None:
        log.debug("tickle socket error: %s", exc)
