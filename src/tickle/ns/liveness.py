"""Liveness: whether a computer is online, from its last contact and its Task Request Interval.

Every contact of an agent (poll, pull, policy fetch, status event) reaches the NS through its
task server's batched contact reports; registration stamps it directly. A computer is offline
when it has not been heard from within `offline_intervals` x the Task Request Interval plus
`offline_slack_s`: an agent polls at least once per interval (jitter stretches that by at most
half), and the slack covers the task servers' contact report interval and transport delays.
The gauge `tickle_computers{state}` counts computers per state at each scrape.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tickle.messages import Liveness


@dataclass(frozen=True, slots=True)
class OfflineBound:
    """How long a computer may stay silent and still count as online."""

    intervals: float  # Task Request Intervals
    slack_s: float

    def after_s(self, task_request_interval_s: float) -> float:
        """Seconds without contact after which a computer is offline."""
        return self.intervals * task_request_interval_s + self.slack_s

    def online_since(self, task_request_interval_s: float, now: float | None = None) -> float:
        """The earliest last contact that still counts as online now."""
        return (time.time() if now is None else now) - self.after_s(task_request_interval_s)


# the NS settings' defaults (offline_intervals, offline_slack_s)
DEFAULT_BOUND = OfflineBound(intervals=2.0, slack_s=60.0)


class LivenessGauge(Collector):
    """`tickle_computers{state="online"|"offline"}`, counted in the database at each scrape."""

    def __init__(self, count: Callable[[], dict[Liveness, int]]) -> None:
        self._count = count

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # described without a database read: registration happens before the NS serves
        yield GaugeMetricFamily("tickle_computers", _HELP, labels=["state"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("tickle_computers", _HELP, labels=["state"])
        for state, n in self._count().items():
            family.add_metric([state], n)
        yield family


_HELP = "Computers (not forgotten) per liveness state"
