"""The Prometheus metrics every component exposes, each on its own registry.

A registry per component instance keeps several components (or a simulated fleet) in one process
apart, and makes tests independent.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from tickle.wire import Kind, RejectReason

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0,
)  # fmt: skip


class ComponentMetrics:
    """Counters and histograms for one component (labelled with its component name)."""

    def __init__(self, component: str) -> None:
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

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
