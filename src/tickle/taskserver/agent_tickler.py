"""The task server's agent tickler: tells its agents, by confirmed tickle, that work is waiting.

Agents in CEM mode are never tickled (they poll, or hold a long-poll: see long_polls.py); whenever
an agent would be tickled, its waiting long-poll is answered too. The first send of a `tasks`
tickle reports the executions it announces as `agent_tickled`, so the NS timeline shows the hop.
An agent that has not pulled after the last resend is reported tickle-unreachable to the NS
(`clock_skewed` when its clock is further off than the freshness window: it rejected the tickles
as stale), and reachable again once a pull answers a tickle.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Set as AbstractSet

from tickle import wire
from tickle.backoff import Backoff
from tickle.metrics import ComponentMetrics
from tickle.taskserver.agent_clocks import AgentClocks
from tickle.taskserver.long_polls import LongPolls
from tickle.taskserver.state_reporter import StateReporter
from tickle.taskserver.store import Store
from tickle.taskserver.work_cache import WorkCache
from tickle.tickling import PullsDue, Tickler

log = logging.getLogger(__name__)
# with `window_initial` and no `window_target_s` (a slow start): the places each pull served
# opens beyond its own, up to the window; sends then follow the pulls served at most 1.5 times as
# fast. With `window_target_s` the window follows the pulls' delay instead (tickle.tickling)
WINDOW_GROWTH = 0.5


class AgentTickler:
    """Tickles the agents that have cached work to pull, or new settings."""

    def __init__(
        self,
        name: str,
        store: Store,
        work_cache: WorkCache,
        reporter: StateReporter,
        metrics: ComponentMetrics,
        backoff: Backoff | None = None,
        clocks: AgentClocks | None = None,
        rate: float | None = None,
        window: int | None = None,
        long_polls: LongPolls | None = None,
        window_initial: int | None = None,
        window_target_s: float | None = None,
        pulls_due: PullsDue | None = None,
    ) -> None:
        self._store = store
        self._keys: dict[str, tuple[str, bytes]] = {}  # name -> its key, base64 and decoded
        self.long_polls = long_polls
        self._clocks = clocks
        self._work_cache = work_cache
        self._reporter = reporter
        self._metrics = metrics
        self.tickler = Tickler(
            sender_id=name,
            key_for=self.key_for,
            metrics=metrics,
            backoff=backoff,
            on_unreachable=self.on_unreachable,
            on_reachable=self.on_reachable,
            on_sent=self.on_sent,
            rate=rate,
            window=window,
            reads_after_ack=True,  # AgentPulls.tasks reads the cache right after its ack
            window_initial=window_initial,
            window_growth=WINDOW_GROWTH,
            window_target_s=window_target_s,
            pulls_due=pulls_due,
        )

    @property
    def unreachable(self) -> AbstractSet[str]:
        """The agents declared tickle-unreachable (their policy may long-poll), kept in the store
        across restarts until one answers a tickle."""
        return self._store.unreachable

    async def start(self) -> None:
        await self.tickler.start()

    async def close(self) -> None:
        await self.tickler.close()

    def tickle_pending(self) -> None:
        """Tickle every non-CEM agent that has cached work it has not pulled yet."""
        waiting = sorted({w.computer for w in self._store.pending_work() if not w.agent_pulled})
        self.tickle_computers(waiting)

    def tickle_computers(self, names: list[str]) -> None:
        """Tickle these agents to pull now (not those in CEM mode: they poll); answer their
        long-polls."""
        if self.long_polls is not None:
            self.long_polls.wake(names)
        for name in names:
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
        """Settings changed: tickle every non-CEM agent so it refreshes its policy; answer every
        long-poll (its answer carries the policy)."""
        if self.long_polls is not None:
            self.long_polls.wake_all()
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
            self._keys.pop(name, None)
            return None
        known = self._keys.get(name)  # decoded once per key, not per tickle
        if known is not None and known[0] == client.tickle_key:
            return known[1]
        try:
            key = base64.b64decode(client.tickle_key, validate=True)
        except (binascii.Error, ValueError):
            log.error("the tickle key of %s is not base64", name)
            return None
        self._keys[name] = (client.tickle_key, key)
        return key

    def on_sent(self, name: str, kind: wire.Kind, first_sent: float) -> None:
        if kind is wire.Kind.TASKS:
            self._work_cache.tickled(name, first_sent)

    def on_unreachable(self, name: str) -> None:
        self._store.set_unreachable(name, True)
        if self._clocks is not None and self._clocks.skewed(name):
            offset = self._clocks.offset(name) or 0.0
            log.warning(
                "agent %s rejects tickles as stale: its clock is %+.1fs off ours; it gets its "
                "work by polling", name, offset,
            )  # fmt: skip
            self._reporter.tickle_state(name, "clock_skewed")
            return
        log.warning("agent %s is tickle-unreachable; it gets its work by polling", name)
        self._reporter.tickle_state(name, "unreachable")

    def on_reachable(self, name: str) -> None:
        self._store.set_unreachable(name, False)
        self._reporter.tickle_state(name, "reachable")
