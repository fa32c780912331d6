"""Half of all tickle datagrams dropped by nftables: tickle retries still deliver every execution.

The drop is real: an nftables table of its own on the host, scoped to this test fleet's
127.X.Y.0/24 and the tickle ports, drops each datagram with probability 1/2 (`numgen random mod
2`). It is removed when the test ends, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest

from tests.integration.conftest import Factory, metric
from tests.reliability import record
from tickle.testing.localfleet import AGENT_TICKLE_PORT, TS_TICKLE_PORT, AgentSpec

from .conftest import Planned, Stopwatch, all_final, create_runs, marker_counts, ts_metric_sum

pytestmark = [pytest.mark.integration, pytest.mark.faults, pytest.mark.timeout(300)]

AGENTS = ["a1", "a2", "a3", "a4"]
ROUNDS = 15
POLL_INTERVAL_S = 1800


@contextlib.contextmanager
def dropping_half_the_tickles(net: str) -> Iterator[Callable[[], dict[str, int]]]:
    """Drop 50% of UDP to the tickle ports of `net`.0/24; yield a reader of the counters."""
    nft = shutil.which("nft")
    if nft is None:
        pytest.fail("nft (nftables) is required to drop tickles: run scripts/sysdeps.sh")
    table = f"tickle_faults_{os.getpid()}"
    ports = f"{{ {TS_TICKLE_PORT}, {AGENT_TICKLE_PORT} }}"
    ruleset = (
        f"table inet {table} {{\n"
        "  chain input {\n"
        "    type filter hook input priority -10; policy accept;\n"
        f"    ip daddr {net}.0/24 udp dport {ports} counter\n"
        f"    ip daddr {net}.0/24 udp dport {ports} numgen random mod 2 0 counter drop\n"
        "  }\n"
        "}\n"
    )
    done = subprocess.run([nft, "-f", "-"], input=ruleset, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"nft could not load the drop rule: {done.stderr.strip()}")

    def counters() -> dict[str, int]:
        out = subprocess.run(
            [nft, "-j", "list", "table", "inet", table], capture_output=True, text=True, check=True
        ).stdout
        packets = [
            expr["counter"]["packets"]
            for item in json.loads(out)["nftables"]
            if "rule" in item
            for expr in item["rule"]["expr"]
            if "counter" in expr
        ]
        return {"tickle_datagrams": packets[0], "dropped": packets[1]}

    try:
        yield counters
    finally:
        subprocess.run([nft, "delete", "table", "inet", table], capture_output=True, check=False)


async def test_half_the_tickles_dropped_every_execution_still_arrives_by_tickle(
    fleet_factory: Factory, plan: Planned
) -> None:
    fleet = await fleet_factory(
        ["ts1", "ts2"], [AgentSpec(a, ["ts1" if i < 2 else "ts2"]) for i, a in enumerate(AGENTS)]
    )
    with dropping_half_the_tickles(fleet.net) as counters:
        clock = Stopwatch()
        for i in range(ROUNDS):  # rounds a moment apart: each is a tickle of its own
            await create_runs(fleet, plan, AGENTS, per_computer=1, prefix=f"r{i}-")
            await asyncio.sleep(0.3)
        a = await all_final(fleet, plan.ids, 240, "every execution final despite the drops")
        wall_s = clock()
        seen = counters()
    ns_sent = await metric(fleet.ns_url, "tickle_tickles_sent_total", kind="tasks")
    ns_resent = await metric(fleet.ns_url, "tickle_tickles_resent_total", kind="tasks")
    ts_sent = await ts_metric_sum(fleet, "tickle_tickles_sent_total", kind="tasks")
    ts_resent = await ts_metric_sum(fleet, "tickle_tickles_resent_total", kind="tasks")
    ts_unreachable = await ts_metric_sum(fleet, "tickle_tickles_unreachable_total")
    vias = {a.via[e] for e in plan.ids}
    latency = a.latency_figures()
    record(
        case="50% of tickles dropped",
        done=f"nftables numgen drop of half the datagrams to 50123/50124; {len(plan.ids)}"
        f" run-nows on 4 agents / 2 TS in {ROUNDS} rounds; Task Request Interval"
        f" {POLL_INTERVAL_S} s",
        outcome="pass"
        if vias == {"tickle"} and a.by_status() == {"succeeded": len(plan.ids)}
        else "fail",
        sent=len(plan.ids),
        recorded=a.recorded(),
        duplicated=a.duplicated(),
        tried=1,
        datagrams=seen["tickle_datagrams"],
        dropped=seen["dropped"],
        ns_tickles_sent=int(ns_sent),
        ns_tickles_resent=int(ns_resent),
        ts_tickles_sent=ts_sent,
        ts_tickles_resent=ts_resent,
        agents_declared_unreachable=ts_unreachable,
        wall_s=wall_s,
        **latency,
    )
    assert seen["dropped"] > 0, "nothing was dropped"
    assert ns_resent + ts_resent > 0, "no tickle was resent"
    assert 0.3 < seen["dropped"] / seen["tickle_datagrams"] < 0.7, seen
    assert a.by_status() == {"succeeded": len(plan.ids)}, a.by_status()
    assert vias == {"tickle"}, f"some executions did not arrive by tickle: {vias}"
    assert latency["max_s"] < POLL_INTERVAL_S / 10, latency
    assert a.duplicated() == 0
    assert max(marker_counts(plan).values()) == 1
