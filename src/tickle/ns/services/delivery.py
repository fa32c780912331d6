"""The delivery service: run now, the progress of runs and executions, the task servers' pulls of
work and the status events they report — telling the tickle server and counting in the metrics."""

from __future__ import annotations

import functools
import logging
import time
from collections import Counter
from collections.abc import Sequence

from fastapi.concurrency import run_in_threadpool

from tickle import messages as m
from tickle import wire
from tickle.metrics import ComponentMetrics
from tickle.ns import lifecycle
from tickle.ns.credentials import Caller
from tickle.ns.stores.cancel import CancelStore, cancelled_for
from tickle.ns.stores.delivery import AlsoInRun, DeliveryStore
from tickle.ns.tickle_server import TickleServer
from tickle.serving import on_route_thread

log = logging.getLogger(__name__)


class DeliveryService:
    """Runs and their delivery, over the delivery store and the tickle server."""

    def __init__(
        self,
        store: DeliveryStore,
        tickle_server: TickleServer,
        metrics: ComponentMetrics,
        cancels: CancelStore | None = None,
        default_expiry_s: float | None = None,
    ) -> None:
        self._store = store
        self._tickle_server = tickle_server
        self._metrics = metrics
        self._cancels = cancels
        self._default_expiry_s = default_expiry_s

    async def run_now(self, body: m.RunCreate, also: AlsoInRun | None = None) -> m.RunOut:
        """Create the run's executions (expiring as the run says, else the site default) and
        tickle their task servers. `also`: more writes in the run's transaction (its audit)."""
        if body.expires_in_s is None and self._default_expiry_s is not None:
            body = body.model_copy(update={"expires_in_s": self._default_expiry_s})
        run = await on_route_thread(self._store.create_run, body, also)
        # after the commit, so the task server's pull sees the work
        self._tickle_server.notify({e.task_server for e in run.executions if e.task_server})
        log.info("run %d: %d execution(s)", run.id, len(run.executions))
        return run

    async def rerun(
        self, run_id: int, failed: bool, expires_in_s: float | None, also: AlsoInRun | None = None
    ) -> m.RunOut:
        """Run `run_id`'s task, job or ad-hoc command again on its computers (`failed`: those
        that did not succeed)."""
        body = await run_in_threadpool(self._store.rerun_of, run_id, failed)
        return await self.run_now(body.model_copy(update={"expires_in_s": expires_in_s}), also)

    async def pull_work(self, ts: Caller, via: m.TsPullVia) -> m.WorkOut:
        """The task server's pull; one a tickle caused acknowledges it."""
        now = time.time()
        # only a pull the tickle caused proves the task server tickle-reachable; a check does
        # not (the tickle may have been dropped)
        with self._tickle_server.pulling(ts.name, wire.Kind.TASKS, via == "tickle"):
            # the tickle's `tickle_sent_at` stamp, in the pull's transaction (see `unstamped`)
            sent_at = self._tickle_server.unstamped(ts.name)
            work = await on_route_thread(self._pull, ts, now, via, sent_at)
            if sent_at is not None:
                self._tickle_server.stamped(ts.name, sent_at)
        self._metrics.pulls_by(via).inc()
        return work

    def _pull(
        self, ts: Caller, now: float, via: m.TsPullVia, tickle_sent_at: float | None
    ) -> m.WorkOut:
        """The pull's reads and writes, in one transaction on one trip to a thread; with the
        cancels its agents must hear of (never start those, stop them where they run)."""
        cancels = (
            None
            if self._cancels is None
            else functools.partial(cancelled_for, ts_id=ts.id, now=now)
        )
        return self._store.pull_work(ts, now, via, tickle_sent_at, cancels)

    async def record_events(self, ts: Caller, events: Sequence[lifecycle.Event]) -> m.EventAck:
        """Record the task server's status events (each once) and count what they did."""
        outcome = await on_route_thread(self._store.record_events, ts, events, time.time())
        for kind, count in Counter(event.kind for event in outcome.recorded).items():
            self._metrics.status_events_by(kind).inc(count)
        for latency, final in zip(outcome.run_now_to_recorded, outcome.finished, strict=True):
            self._metrics.run_now_to_recorded.observe(latency)
            self._metrics.executions_by(final).inc()
        return m.EventAck(accepted=outcome.accepted)

    def run(self, run_id: int) -> m.RunOut:
        return self._store.run(run_id)

    def execution(self, execution_id: int) -> m.ExecutionOut:
        return self._store.execution(execution_id)
