"""The task server's agent tickler: tells its agents, by confirmed tickle, that work is waiting.

Agents in CEM mode are never tickled (they poll). The first send of a `tasks` tickle queues an
`agent_tickled` status event for each execution it announces, so the NS timeline shows the hop.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
import uuid
from collections.abc import Callable
from typing import Literal

from tickle import wire
from tickle.backoff import Backoff
from tickle.messages import ComputerState, StatusEvent, WorkOut
from tickle.metrics import ComponentMetrics
from tickle.outbox import Outbox
from tickle.taskserver.state_reporter import StateReporter
from tickle.taskserver.store import Store
from tickle.tickling import Tickler

log = logging.getLogger(__name__)


class AgentTickler:
    """Reconciles the work cache with the NS and tickles the agents that have work to pull."""

    def __init__(
        self,
        name: str,
        store: Store,
        outbox: Outbox,
        wake_forwarder: Callable[[], None],
        reporter: StateReporter,
        metrics: ComponentMetrics,
        backoff: Backoff | None = None,
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._wake_forwarder = wake_forwarder
        self._reporter = reporter
        self._metrics = metrics
        self._known_state: dict[str, str] = {}  # last reachability told to the NS
        self.tickler = Tickler(
            sender_id=name,
            key_for=self.key_for,
            metrics=metrics,
            backoff=backoff,
            on_unreachable=self.on_unreachable,
            on_reachable=self.on_reachable,
            on_sent=self.on_sent,
        )

    async def start(self) -> None:
        await self.tickler.start()

    async def close(self) -> None:
        await self.tickler.close()

    def apply_work(self, work: WorkOut) -> list[int]:
        """A work pull came back: update the cache, tickle who has work; return new ids."""
        new = self._store.reconcile(work.executions)
        if new:
            log.info("work from the NS: %d new executions %s", len(new), new)
        self.tickle_pending()
        return new

    def tickle_pending(self) -> None:
        """Tickle every non-CEM agent that has cached work it has not pulled yet."""
        waiting = sorted({w.computer for w in self._store.pending_work() if not w.agent_pulled})
        for name in waiting:
            client = self._store.client(name)
            if client is None:
                log.warning("work cached for %s, which is not a client of this task server", name)
                continue
            if client.cem:
                self._metrics.tickles_skipped_cem.inc()
                continue
            addr = client.tickle_addr
            if addr is None:
                log.warning("no tickle address known for %s; it will get its work by polling", name)
                continue
            self.tickler.tickle(name, addr, wire.Kind.TASKS)

    def tickle_settings(self) -> None:
        """Settings changed: tickle every non-CEM agent so it refreshes its policy."""
        for client in self._store.clients():
            addr = client.tickle_addr
            if not client.cem and addr is not None:
                self.tickler.tickle(client.name, addr, wire.Kind.SETTINGS)

    def ack(self, name: str, kind: wire.Kind) -> bool:
        """The agent pulled (tasks or policy): its tickle of that kind is answered."""
        return self.tickler.ack(name, kind)

    # --- Tickler callbacks ----------------------------------------------------------------------

    def key_for(self, name: str) -> bytes | None:
        client = self._store.client(name)
        if client is None:
            return None
        try:
            return base64.b64decode(client.tickle_key, validate=True)
        except (binascii.Error, ValueError):
            log.error("the tickle key of %s is not base64", name)
            return None

    def on_sent(self, name: str, kind: wire.Kind, first_sent: float) -> None:
        if kind is not wire.Kind.TASKS:
            return
        fresh = [w for w in self._store.pending_work(name) if not w.agent_tickled]
        if not fresh:
            return
        now = time.time()
        events = [
            StatusEvent(
                event_id=str(uuid.uuid4()),
                execution_id=w.execution_id,
                computer=name,
                kind="agent_tickled",
                at=first_sent,
                cached_at=now,
            )
            for w in fresh
        ]
        self._outbox.put_many((e.event_id, e.model_dump_json()) for e in events)
        self._store.mark("agent_tickled", (w.execution_id for w in fresh))
        self._metrics.status_events.labels(kind="agent_tickled").inc(len(events))
        self._wake_forwarder()

    def on_unreachable(self, name: str) -> None:
        log.warning("agent %s is tickle-unreachable; it gets its work by polling", name)
        self._tell_ns(name, "unreachable")

    def on_reachable(self, name: str) -> None:
        self._tell_ns(name, "reachable")

    def _tell_ns(self, name: str, state: Literal["reachable", "unreachable"]) -> None:
        # unreachable is told every time (a new outage); reachable only when it changes
        if state == "reachable" and self._known_state.get(name) == state:
            return
        self._known_state[name] = state
        self._reporter.report(ComputerState(name=name, tickle_state=state, at=time.time()))
