"""The tickle listener: a UDP endpoint that turns verified tickles into pulls.

Used by the task server (tickles from the NS) and the agent (tickles from its task server). A
tickle carries no task: `tasks` makes the receiver pull its work at once, `settings` makes it pull
its settings. Every datagram goes through the component's `TickleGuard` first; a rejected one is
counted by reason and never causes a pull. The guard keeps its senders' high-water marks in the
component's database (`localdb.HighWaterMarks`), so a replay is rejected after a restart too.

Every rejection is counted, but the log gets at most a line per reason and interval
(`RejectionLog`): a flood of bad datagrams must not flood the log, nor push real lines past
journald's rate limit.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from tickle import wire
from tickle.metrics import Metrics

log = logging.getLogger(__name__)

# after a reason's rejection is logged, further ones are only counted this long, then summed up
REJECTION_LOG_INTERVAL_S = 60.0


class TickleListener(asyncio.DatagramProtocol):
    """Checks every datagram with `guard`; a valid tickle calls `on_tasks` or `on_settings`.

    The callbacks run in the event loop's datagram handler: they must not block. Rejections are
    logged by a `RejectionLog` of `log_interval_s`, and each is handed to `on_rejected` when given
    (the agent explains stale ones by its clock).
    """

    def __init__(
        self,
        guard: wire.TickleGuard,
        metrics: Metrics,
        on_tasks: Callable[[], None],
        on_settings: Callable[[], None],
        log_interval_s: float = REJECTION_LOG_INTERVAL_S,
        on_rejected: Callable[[wire.TickleRejected], None] | None = None,
    ) -> None:
        self._guard = guard
        self._on_rejected = on_rejected
        self._metrics = metrics
        self._rejections = RejectionLog(log_interval_s)
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
        """Close the endpoint, log the rejections only counted so far (safe to call again)."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self._rejections.close()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        try:
            tickle = self._guard.check(data)
        except wire.TickleRejected as exc:
            self._metrics.tickles_rejected.labels(reason=exc.reason.value).inc()
            self._rejections.rejected(str(addr[0]), exc)
            if self._on_rejected is not None:
                self._on_rejected(exc)
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


@dataclass
class _Quiet:
    """A reason whose rejections are only counted for now."""

    since: float
    timer: asyncio.TimerHandle
    more: int = 0
    last: str = ""


class RejectionLog:
    """Logs a reason's first rejection at once, and the further ones in one line per interval.

    The line that sums them up ("N more ... since ...") is written when the interval is over,
    and the next interval starts with it; an interval without rejections ends the quiet, so the
    next rejection of that reason is logged at once again. Runs in the event loop (timers).
    """

    def __init__(self, interval_s: float = REJECTION_LOG_INTERVAL_S) -> None:
        self._interval_s = interval_s
        self._quiet: dict[wire.RejectReason, _Quiet] = {}

    def rejected(self, host: str, exc: wire.TickleRejected) -> None:
        """One datagram from `host` was rejected."""
        quiet = self._quiet.get(exc.reason)
        if quiet is None:
            log.info("tickle from %s rejected: %s", host, exc, extra={"reason": exc.reason.value})
            self._keep_quiet(exc.reason)
            return
        quiet.more += 1
        quiet.last = f"{host}: {exc.detail}"

    def close(self) -> None:
        """Write what is still only counted, and stop the timers."""
        for reason, quiet in self._quiet.items():
            quiet.timer.cancel()
            self._sum_up(reason, quiet)
        self._quiet.clear()

    def _keep_quiet(self, reason: wire.RejectReason) -> None:
        timer = asyncio.get_running_loop().call_later(self._interval_s, self._interval_over, reason)
        self._quiet[reason] = _Quiet(since=time.time(), timer=timer)

    def _interval_over(self, reason: wire.RejectReason) -> None:
        quiet = self._quiet.pop(reason)
        self._sum_up(reason, quiet)
        if quiet.more:  # the flood goes on: one line per interval
            self._keep_quiet(reason)

    @staticmethod
    def _sum_up(reason: wire.RejectReason, quiet: _Quiet) -> None:
        if quiet.more:
            since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(quiet.since))
            log.info(
                "%d more tickles rejected as %s since %s (the last from %s)",
                quiet.more, reason.value, since, quiet.last,
                extra={"reason": reason.value, "more": quiet.more},
            )  # fmt: skip
