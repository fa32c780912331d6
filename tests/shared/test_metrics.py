"""The metrics every component exposes from its start, before anything happened."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tickle.metrics import AgentMetrics, ComponentMetrics
from tickle.wire import Kind, RejectReason


def test_tickle_counters_are_exposed_for_every_kind_at_zero() -> None:
    text = generate_latest(ComponentMetrics("task-server").registry).decode()
    for kind in Kind:
        label = kind.name.lower()
        for name in ("tickle_tickles_sent_total", "tickle_tickles_resent_total",
                     "tickle_tickles_received_total"):  # fmt: skip
            assert f'{name}{{kind="{label}"}} 0.0' in text, f"{name} kind={label} missing"


def _samples(text: str, families: set[str]) -> dict[str, list[tuple[str, str, float]]]:
    """{family: its samples}, `_created` ones without their value (each counts its own start)."""
    found: dict[str, list[tuple[str, str, float]]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in families:
            found[f"{family.name} {family.type} {family.documentation}"] = sorted(
                (
                    s.name,
                    repr(sorted(s.labels.items())),
                    0.0 if s.name.endswith("_created") else s.value,
                )
                for s in family.samples
            )
    return found


def test_the_agents_metrics_expose_what_the_component_metrics_would() -> None:
    # the agent counts in plain numbers (prometheus_client loaded only to render): the same
    # families, help, labels and values as the servers' metrics of the same names
    light, full = AgentMetrics(), ComponentMetrics("agent")
    depth = [3.0]
    for metrics in (light, full):
        metrics.pulls.labels(via="tickle").inc()
        metrics.pulls.labels(via="poll").inc(2)
        metrics.polls.inc()
        metrics.executions.labels(status="succeeded").inc()
        metrics.tickles_received.labels(kind="tasks").inc()
        metrics.tickles_rejected.labels(reason=RejectReason.STALE.value).inc()
        metrics.outbox_depth.set_function(lambda: depth[0])
        metrics.outbox_oldest_age.set(12.5)
    light_text = light.render()[0].decode()
    names = {f.name for f in text_string_to_metric_families(light_text)}
    counters = {"tickle_pulls", "tickle_polls", "tickle_executions", "tickle_tickles_received",
                "tickle_tickles_rejected"}  # fmt: skip
    gauges = {"tickle_outbox_depth", "tickle_outbox_oldest_age_seconds"}
    # (the text format writes each counter's start times as a family of its own, `_created`)
    assert names == counters | gauges | {f"{c}_created" for c in counters}
    assert _samples(light_text, names) == _samples(full.render()[0].decode(), names)
    assert light.render()[1] == full.render()[1]
    depth[0] = 5.0
    assert "tickle_outbox_depth 5.0" in light.render()[0].decode()


def test_a_counters_children_kept_at_hand_are_its_own_and_count_in_the_exposition() -> None:
    metrics = ComponentMetrics("task-server")
    assert metrics.pulls_by("tickle") is metrics.pulls_by("tickle")
    assert metrics.pulls_by("tickle") is metrics.pulls.labels(via="tickle")
    metrics.pulls_by("tickle").inc(2)
    metrics.status_events_by("finished").inc()
    text = generate_latest(metrics.registry).decode()
    assert 'tickle_pulls_total{via="tickle"} 2.0' in text
    assert 'tickle_status_events_total{kind="finished"} 1.0' in text
