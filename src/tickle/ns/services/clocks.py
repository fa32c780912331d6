"""The clocks service: how far each task server's clock is off the NS's, measured from its requests.

Every request of a task server carries its time (`X-Tickle-Time`); against the request's arrival it
gives a sample of its offset less the request's delay, and `clock.OffsetEstimator` keeps the
largest of the last few, the least delayed (in this process). The estimate is written to the
database when it moved by `SAVE_STEP_S`, so every NS process shows it; a task server further off
than the tickle freshness window is `clock_skewed` (it rejects every tickle as stale). The agents'
offsets come from their task servers (`POST /api/ts/computers/state`).

`ClockMetrics` exposes, read from the database at each scrape: a gauge per task server
(`tickle_task_server_clock_offset_seconds`) and the number of clock-skewed computers — one gauge,
not a label per agent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

from tickle import clock, wire
from tickle.ns.credentials import Caller
from tickle.ns.stores.inventory import InventoryStore

log = logging.getLogger(__name__)

# an estimate is saved again once it moved this far from the one saved
SAVE_STEP_S = 0.5
# the task servers' tickle freshness window, as the NS assumes it (their default)
TS_FRESHNESS_S = wire.DEFAULT_FRESHNESS_S


class ClockService:
    """Samples the task servers' clocks (the API's threads call `sample`: it locks)."""

    def __init__(self, store: InventoryStore, window_s: float = TS_FRESHNESS_S) -> None:
        self._store = store
        self._window_s = window_s
        self._estimates = clock.OffsetEstimator(one_way=True)
        self._saved: dict[str, float] = {}
        self._lock = threading.Lock()

    def sample(self, ts: Caller, their_time: float, arrived_at: float) -> None:
        """Task server `ts` sent a request stamped `their_time` that arrived at `arrived_at`.

        Writes to the database (blocking) when the estimate moved: call it off the event loop.
        """
        save = self.note(ts, their_time, arrived_at)
        if save is not None:
            self.save(ts, *save)

    def note(
        self, ts: Caller, their_time: float, arrived_at: float
    ) -> tuple[float, str | None] | None:
        """`sample` without its write (no blocking: safe on the event loop): the offset and state
        to `save` when the estimate moved, else None."""
        with self._lock:
            offset = self._estimates.add(ts.name, their_time - arrived_at)
            saved = self._saved.get(ts.name)
            if saved is not None and abs(offset - saved) < SAVE_STEP_S:
                return None
            self._saved[ts.name] = offset
        was, now = clock.skewed(saved, self._window_s), clock.skewed(offset, self._window_s)
        state = None
        if now and not was:
            log.warning(
                "task server %s: its clock is %+.1fs off ours, beyond the %.0fs tickle freshness "
                "window: it rejects every tickle as stale and gets its work by its periodic check",
                ts.name, offset, self._window_s,
            )  # fmt: skip
            state = "clock_skewed"
        elif was and not now:
            state = "unknown"  # until a tickle is answered again
        return offset, state

    def save(self, ts: Caller, offset: float, state: str | None) -> None:
        """Write what `note` returned (blocking)."""
        try:
            self._store.set_task_server_clock(ts.name, round(offset, 3), state)
        except SQLAlchemyError as exc:  # a measurement never fails the request: the next saves
            log.warning("clock offset of task server %s not saved: %s", ts.name, exc)
            with self._lock:
                self._saved.pop(ts.name, None)


class ClockMetrics(Collector):
    """The clock gauges, read from the database at each scrape."""

    def __init__(self, store: InventoryStore) -> None:
        self._store = store

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # the families without a database query (at registration, and for a scrape that names
        # its metrics: only a collector that describes one of them is read)
        yield _per_ts()
        yield GaugeMetricFamily("tickle_computers_clock_skewed", _SKEWED_HELP)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        offsets, skewed = self._store.clock_figures()
        per_ts = _per_ts()
        for name, offset in sorted(offsets.items()):
            per_ts.add_metric([name], offset)
        yield per_ts
        yield GaugeMetricFamily("tickle_computers_clock_skewed", _SKEWED_HELP, value=skewed)


def _per_ts() -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "tickle_task_server_clock_offset_seconds",
        "How far each task server's clock is ahead of the NS's (measured from its requests)",
        labels=["task_server"],
    )


_SKEWED_HELP = (
    "Computers whose clock is further off their task server's than the tickle freshness "
    "window (they reject every tickle as stale)"
)
