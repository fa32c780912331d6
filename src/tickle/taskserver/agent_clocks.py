"""How far each agent's clock is off the task server's, measured from the agent's requests.

Every authenticated request of an agent carries its time (`X-Tickle-Time`); against the request's
arrival it gives a sample of the agent's offset less the request's delay, and
`clock.OffsetEstimator` keeps the largest of the last few (the least delayed). The estimate is
reported to the NS (when it moved by `REPORT_STEP_S`), counted in the metrics (how many agents are
skewed, the largest offset: no label per agent), and an agent further off than the tickle freshness
window is reported `clock_skewed`: it rejects every tickle as stale, which otherwise looks exactly
like a firewall (`unreachable`).
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Gauge

from tickle import clock
from tickle.messages import TickleState
from tickle.metrics import ComponentMetrics
from tickle.taskserver.state_reporter import StateReporter

log = logging.getLogger(__name__)

# an estimate is reported to the NS again once it moved this far from the one reported
REPORT_STEP_S = 0.5


class AgentClocks:
    """The task server's estimate of each agent's clock offset (positive: the agent is ahead)."""

    def __init__(self, reporter: StateReporter, metrics: ComponentMetrics, window_s: float) -> None:
        self._reporter = reporter
        self._window_s = window_s
        self._estimates = clock.OffsetEstimator(one_way=True)
        self._reported: dict[str, float] = {}
        self._skewed: set[str] = set()
        self._skewed_gauge = Gauge(
            "tickle_agents_clock_skewed",
            "Agents whose clock is further off the task server's than the tickle freshness "
            "window (they reject every tickle as stale)",
            registry=metrics.registry,
        )
        largest = Gauge(
            "tickle_agent_clock_offset_max_seconds",
            "The largest clock offset (absolute) measured among this task server's agents",
            registry=metrics.registry,
        )
        largest.set_function(self._largest)

    def sample_header(self, name: str, header: str | None, arrived_at: float, cem: bool) -> None:
        """A request of agent `name` (in CEM mode or not) that arrived at `arrived_at` carried
        `header` (`X-Tickle-Time`, None: none): a sample when it holds a time."""
        theirs = clock.parse_header(header, arrived_at)
        if theirs is not None:
            self.sample(name, theirs, arrived_at, tickled=not cem)

    def sample(self, name: str, their_time: float, arrived_at: float, tickled: bool) -> None:
        """Agent `name` sent a request stamped `their_time` that arrived at `arrived_at`.

        `tickled`: whether tickles are sent to it (not in CEM mode), so its skew is a tickle state.
        """
        offset = self._estimates.add(name, their_time - arrived_at)
        was, now = name in self._skewed, clock.skewed(offset, self._window_s)
        state: TickleState | None = None
        if now and not was:
            self._skewed.add(name)
            log.warning(
                "agent %s: its clock is %+.1fs off ours, beyond the %.0fs tickle freshness "
                "window: it rejects every tickle as stale and gets its work by polling",
                name, offset, self._window_s,
            )  # fmt: skip
            state = "clock_skewed"
        elif was and not now:
            self._skewed.discard(name)
            log.info("agent %s: its clock is back within the window (%+.1fs)", name, offset)
            state = "unknown"  # until a tickle is answered again
        if state is not None:
            self._skewed_gauge.set(len(self._skewed))
        reported = self._reported.get(name)
        if state is None and reported is not None and abs(offset - reported) < REPORT_STEP_S:
            return
        self._reported[name] = offset
        self._reporter.note(
            name, time.time(), tickle_state=state if tickled else None,
            clock_offset_s=round(offset, 3),
        )  # fmt: skip

    def offset(self, name: str) -> float | None:
        """The estimate of agent `name`'s offset (None: no request of it measured yet)."""
        return self._estimates.offset(name)

    def skewed(self, name: str) -> bool:
        """Whether agent `name`'s clock is further off than the tickle freshness window."""
        return name in self._skewed

    def _largest(self) -> float:
        return max((abs(v) for v in self._estimates.offsets().values()), default=0.0)
