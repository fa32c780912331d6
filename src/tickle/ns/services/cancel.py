"""The cancel service: cancel a run or one execution, and tell the tickle server, whose next pass
tickles the task servers concerned (they drop what did not start and hand the cancel to the agents
that pulled it)."""

from __future__ import annotations

import logging
import time

from fastapi.concurrency import run_in_threadpool

from tickle import messages as m
from tickle.metrics import ComponentMetrics
from tickle.ns.stores.cancel import CancelStore
from tickle.ns.tickle_server import TickleServer

log = logging.getLogger(__name__)


class CancelService:
    """Cancels over the cancel store and the tickle server."""

    def __init__(
        self, store: CancelStore, tickle_server: TickleServer, metrics: ComponentMetrics
    ) -> None:
        self._store = store
        self._tickle_server = tickle_server
        self._metrics = metrics

    async def cancel(self, run_id: int, execution_id: int | None) -> m.CancelOut:
        """Cancel the run's unfinished executions (or one): see `stores/cancel.py`."""
        out = await run_in_threadpool(self._store.cancel, run_id, execution_id, time.time())
        self._metrics.executions.labels(status="cancelled").inc(len(out.cancelled))
        if out.cancelled or out.stopping:
            self._tickle_server.notify()  # after the commit: the task servers' pulls see it
        log.info(
            "run %d cancelled: %d ended, %d being stopped, %d had ended",
            run_id, len(out.cancelled), len(out.stopping), len(out.already_final),
        )  # fmt: skip
        return out
