"""The sweep: the active tickle dispatcher ends, every `sweep_interval_s`, the executions that
expired unstarted and those lost with their computer (`stores/cancel.py` says when), and counts
them in the metrics."""

from __future__ import annotations

import asyncio
import time

from tickle.metrics import ComponentMetrics
from tickle.ns.settings import NsSettings
from tickle.ns.stores.cancel import CancelStore, Swept


class Sweeper:
    """Runs the sweep when it is due (called by each dispatch pass)."""

    def __init__(self, settings: NsSettings, store: CancelStore, metrics: ComponentMetrics) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics
        self._last = 0.0

    async def sweep_if_due(self) -> Swept | None:
        """Sweep if `sweep_interval_s` passed since the last sweep; what it ended."""
        now = time.time()
        if now - self._last < self._settings.sweep_interval_s:
            return None
        self._last = now
        s = self._settings
        swept = await asyncio.to_thread(
            self._store.sweep, now, s.lost_after_intervals, s.lost_grace_s
        )
        self._metrics.executions.labels(status="expired").inc(len(swept.expired))
        self._metrics.executions.labels(status="lost").inc(len(swept.lost))
        return swept
