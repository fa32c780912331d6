"""The metrics every component exposes from its start, before anything happened."""

from __future__ import annotations

from prometheus_client import generate_latest

from tickle.metrics import ComponentMetrics
from tickle.wire import Kind


def test_tickle_counters_are_exposed_for_every_kind_at_zero() -> None:
    text = generate_latest(ComponentMetrics("task-server").registry).decode()
    for kind in Kind:
        label = kind.name.lower()
        for name in ("tickle_tickles_sent_total", "tickle_tickles_resent_total",
                     "tickle_tickles_received_total"):  # fmt: skip
            assert f'{name}{{kind="{label}"}} 0.0' in text, f"{name} kind={label} missing"
