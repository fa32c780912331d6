"""The Prometheus metrics every component exposes, each on its own registry.

A registry per component instance keeps several components (or a simulated fleet) in one process
apart, and makes tests independent.

The servers' `ComponentMetrics` are prometheus_client's. The agent's (`AgentMetrics`: only what
an agent counts) are plain numbers until something reads /metrics: prometheus_client, which cost
the agent 2-4 MB at rest, is loaded by the first `render()` only and writes the same exposition
(S7 of issue 10). This module imports prometheus_client only when one of them needs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING, Any

from tickle.wire import Kind, RejectReason

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0,
)  # fmt: skip


class Labelled:
    """A labelled metric's children by the value of its one label, each made once:
    prometheus_client's `labels()` costs microseconds a call, and a run-now makes several per
    agent. For labels of a few values (kinds, triggers, statuses)."""

    __slots__ = ("_children", "_label", "_metric")

    def __init__(self, metric: Any, label: str) -> None:
        self._metric = metric
        self._label = label
        self._children: dict[str, Any] = {}

    def __call__(self, value: str) -> Any:
        """The child for this label value (a Counter's, a Histogram's: `inc`, `observe`)."""
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = self._metric.labels(**{self._label: value})
        return child


class ComponentMetrics:
    """Counters and histograms for one component (labelled with its component name)."""

    def __init__(self, component: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.component = component
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tickles_sent = Counter(
            "tickle_tickles_sent", "Tickle datagrams sent (first sends)", ["kind"], registry=r
        )
        self.tickles_resent = Counter(
            "tickle_tickles_resent", "Tickle datagrams resent for lack of a pull", ["kind"],
            registry=r,
        )  # fmt: skip
        self.tickles_received = Counter(
            "tickle_tickles_received", "Valid tickle datagrams received", ["kind"], registry=r
        )
        self.tickles_rejected = Counter(
            "tickle_tickles_rejected", "Tickle datagrams rejected, by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        self.tickles_unreachable = Counter(
            "tickle_tickles_unreachable",
            "Targets declared tickle-unreachable after the last try", registry=r,
        )  # fmt: skip
        self.tickles_skipped_cem = Counter(
            "tickle_tickles_skipped_cem", "Tickles not sent because the target is in CEM mode",
            registry=r,
        )  # fmt: skip
        self.long_polls_waiting = Gauge(
            "tickle_long_polls_waiting",
            "Agents' long-polls waiting at the task server for work, a cancel or new settings",
            registry=r,
        )  # fmt: skip
        self.long_polls_woken = Counter(
            "tickle_long_polls_woken",
            "Long-polls answered because work, a cancel or new settings arrived for the agent",
            registry=r,
        )  # fmt: skip
        self.pulls = Counter("tickle_pulls", "Pulls of work, by trigger", ["via"], registry=r)
        self.polls = Counter("tickle_polls", "Polls (pulls not caused by a tickle)", registry=r)
        self.tickle_to_pull = Histogram(
            "tickle_tickle_to_pull_seconds", "Time from a tickle's first send to the pull",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.run_now_to_recorded = Histogram(
            "tickle_run_now_to_recorded_seconds",
            "Time from run-now to the finished event recorded at the NS",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.status_events = Counter(
            "tickle_status_events", "Status events accepted, by kind", ["kind"], registry=r
        )
        self.outbox_depth = Gauge(
            "tickle_outbox_depth", "Status events waiting in the durable outbox", registry=r
        )
        self.outbox_oldest_age = Gauge(
            "tickle_outbox_oldest_age_seconds",
            "Age of the oldest status event waiting in the durable outbox (0 when it is empty)",
            registry=r,
        )  # fmt: skip
        self.executions = Counter(
            "tickle_executions", "Executions finished, by status", ["status"], registry=r
        )
        self.http_refused = Counter(
            "tickle_http_refused", "API requests and connections refused by the request limits, "
            "by reason", ["reason"], registry=r,
        )  # fmt: skip
        for kind in Kind:
            self.tickles_sent.labels(kind=kind.name.lower())
            self.tickles_resent.labels(kind=kind.name.lower())
            self.tickles_received.labels(kind=kind.name.lower())
        for reason in RejectReason:
            self.tickles_rejected.labels(reason=reason.value)
        # the counters a run-now counts per agent, their children by label value kept at hand
        self.tickles_sent_by = Labelled(self.tickles_sent, "kind")
        self.tickles_resent_by = Labelled(self.tickles_resent, "kind")
        self.pulls_by = Labelled(self.pulls, "via")
        self.status_events_by = Labelled(self.status_events, "kind")
        self.executions_by = Labelled(self.executions, "status")

    def render(self, names: Collection[str] = ()) -> tuple[bytes, str]:
        """The exposition text and its content type; `names`: only the families of those
        metrics (Prometheus's `name[]` parameter), none of the others read."""
        return _exposition(self.registry, names)


def _exposition(registry: CollectorRegistry, names: Collection[str] = ()) -> tuple[bytes, str]:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    # restricted: a collector that reads the database at each scrape (the NS's computers by
    # liveness, its clocks) is read only when one of its own is asked (a scrape of an NS with
    # 10,000 computers: 9.7 ms whole, 1.4 ms naming one counter)
    exposed = registry.restricted_registry(names) if names else registry
    return generate_latest(exposed), CONTENT_TYPE_LATEST


class _Child:
    """One labelled series of a counter or gauge."""

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()
        self.function: Callable[[], float] | None = None

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def set(self, value: float) -> None:
        self.value = float(value)

    def set_function(self, function: Callable[[], float]) -> None:
        """Read `function` at each scrape instead of the value set (as prometheus_client's)."""
        self.function = function

    def read(self) -> float:
        return float(self.function()) if self.function is not None else self.value


class _Family(_Child):
    """A counter or gauge: its series by label values (itself, when it has no labels)."""

    def __init__(
        self, kind: str, name: str, documentation: str, labels: tuple[str, ...] = ()
    ) -> None:
        super().__init__()
        self.kind = kind
        self.name = name
        self.documentation = documentation
        self.labelnames = labels
        self.children: dict[tuple[str, ...], _Child] = {}

    def labels(self, **labels: str) -> _Child:
        key = tuple(str(labels[name]) for name in self.labelnames)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = _Child()
        return child

    def family(self) -> Metric:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        series = self.children.items() if self.labelnames else [((), self)]
        if self.kind == "counter":
            counter = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
            for key, child in series:
                counter.add_metric(list(key), child.read(), created=child.created)
            return counter
        gauge = GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in series:
            gauge.add_metric(list(key), child.read())
        return gauge


class AgentMetrics:
    """What an agent counts, under the names, help and labels of `ComponentMetrics`."""

    def __init__(self, component: str = "agent") -> None:
        self.component = component
        self.tickles_received = _Family(
            "counter", "tickle_tickles_received", "Valid tickle datagrams received", ("kind",)
        )
        self.tickles_rejected = _Family(
            "counter", "tickle_tickles_rejected", "Tickle datagrams rejected, by reason",
            ("reason",),
        )  # fmt: skip
        self.pulls = _Family("counter", "tickle_pulls", "Pulls of work, by trigger", ("via",))
        self.polls = _Family("counter", "tickle_polls", "Polls (pulls not caused by a tickle)")
        self.outbox_depth = _Family(
            "gauge", "tickle_outbox_depth", "Status events waiting in the durable outbox"
        )
        self.outbox_oldest_age = _Family(
            "gauge", "tickle_outbox_oldest_age_seconds",
            "Age of the oldest status event waiting in the durable outbox (0 when it is empty)",
        )  # fmt: skip
        self.executions = _Family(
            "counter", "tickle_executions", "Executions finished, by status", ("status",)
        )
        for kind in Kind:
            self.tickles_received.labels(kind=kind.name.lower())
        for reason in RejectReason:
            self.tickles_rejected.labels(reason=reason.value)
        self._registry: CollectorRegistry | None = None

    def collect(self) -> Iterator[Metric]:
        """The families as prometheus_client collects them (this object is their collector)."""
        for value in vars(self).values():
            if isinstance(value, _Family):
                yield value.family()

    @property
    def registry(self) -> CollectorRegistry:
        """A prometheus_client registry of these metrics (loading prometheus_client)."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            self._registry = CollectorRegistry(auto_describe=False)
            self._registry.register(self)
        return self._registry

    def render(self, names: Collection[str] = ()) -> tuple[bytes, str]:
        """The exposition text and its content type (prometheus_client is loaded here);
        `names`: only those metrics' families."""
        return _exposition(self.registry, names)


# what the parts both the servers and the agent run (tickle listener, outbox) count into
Metrics = ComponentMetrics | AgentMetrics
