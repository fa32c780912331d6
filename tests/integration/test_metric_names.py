"""Every metric the alert rules and the Grafana dashboard of monitoring/ read is one a running
fleet exposes: the families on the NS's and the task server's /metrics and on an agent's
(control socket), with the series names Prometheus stores for their types."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_monitoring import PENDING, referenced_metrics
from tickle.testing.localfleet import AgentSpec, LocalFleet

from .conftest import Factory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gauge": ("",),
}


async def _scrape(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as resp:
        assert resp.status == 200, url
        return await resp.text()


def _series_names(text: str) -> set[str]:
    """Names of the series a scrape of `text` stores, families without samples included."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


async def _exposed(fleet: LocalFleet) -> dict[str, set[str]]:
    async with aiohttp.ClientSession() as session:
        ns = await _scrape(session, fleet.ns_url + "/metrics")
        ts = await _scrape(session, fleet.ts_url("ts1") + "/metrics")
    connector = aiohttp.UnixConnector(path=str(fleet.root / "a1" / "agent.sock"))
    async with aiohttp.ClientSession(connector=connector) as session:
        agent = await _scrape(session, "http://agent/metrics")
    return {"ns": _series_names(ns), "ts": _series_names(ts), "agent": _series_names(agent)}


async def test_the_rules_and_the_dashboard_read_metrics_the_fleet_exposes(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("a1", ["ts1"])])
    exposed = await _exposed(fleet)
    everywhere = set().union(*exposed.values())
    used = referenced_metrics()
    unknown = {name: sorted(where) for name, where in used.items()
               if name not in everywhere and name not in PENDING}  # fmt: skip
    assert unknown == {}, "the rules or the dashboard read metrics no component exposes"
    assert PENDING & everywhere == set(), (
        "now exposed: take these out of tests/test_monitoring.py's PENDING"
    )
    # the outbox's metrics are on both tiers that hold an outbox, the dispatcher's on the NS
    for tier in ("ts", "agent"):
        assert {"tickle_outbox_depth", "tickle_outbox_oldest_age_seconds"} <= exposed[tier], tier
    assert "tickle_dispatcher_active" in exposed["ns"]
