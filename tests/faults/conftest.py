"""Fault-injection helpers: many run-nows with a marker file, and an audit of the NS database.

The audit opens the NS's SQLite file read-only and counts what was recorded, so "nothing lost,
nothing twice" is checked where it matters (the database), not through the API.
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.agent.conftest import fake_ts, short_dir  # noqa: F401
from tests.integration.conftest import eventually, fleet_factory, metric  # noqa: F401
from tickle.messages import RunCreate, TaskCreate
from tickle.testing.localfleet import LocalFleet

# the agent's events, and the task server's, each exactly once per execution
AGENT_KINDS = ("started", "finished")
TS_KINDS = ("agent_pulled",)


@dataclass
class Planned:
    """Run-nows created for a test: tag -> (computer, execution id)."""

    marker: Path
    executions: dict[str, tuple[str, int]] = field(default_factory=dict)

    @property
    def ids(self) -> set[int]:
        return {eid for _, eid in self.executions.values()}


async def create_runs(
    fleet: LocalFleet,
    plan: Planned,
    computers: list[str],
    per_computer: int,
    sleep_s: float | list[float] = 0.0,
    prefix: str = "r",
    gate: Path | None = None,
    gate_first: bool = False,
) -> None:
    """`per_computer` run-nows on each computer; each appends its tag to the marker file.

    With a `gate`, each task then waits (bounded by its timeout) until that file exists; with
    `gate_first`, it waits for the gate before its sleep instead of after it.
    """
    sleeps = sleep_s if isinstance(sleep_s, list) else [sleep_s] * per_computer
    async with fleet.client() as ns:
        for i in range(per_computer):
            for computer in computers:
                tag = f"{prefix}{i}-{computer}"
                # 0.5 s: 200 tasks waiting at the gate fork 400 sleeps a second, not 2,000 (at
                # 0.1 s they starved the NS of a test beside them of its 30 s to start)
                wait = f"while [ ! -e {gate} ]; do sleep 0.5; done"
                script = f"echo {tag} >> {plan.marker}; "
                if gate is not None and gate_first:
                    script += f"{wait}; sleep {sleeps[i]}"
                elif gate is not None:
                    script += f"sleep {sleeps[i]}; {wait}"
                else:
                    script += f"sleep {sleeps[i]}"
                task = await ns.add_task(
                    TaskCreate(name=tag, command=["sh", "-c", script], timeout_s=120)
                )
                run = await ns.run_now(RunCreate(task_id=task.id, computers=[computer]))
                plan.executions[tag] = (computer, run.executions[0].id)


def marker_counts(plan: Planned) -> Counter[str]:
    """How many times each tag ran (a line per run)."""
    if not plan.marker.exists():
        return Counter()
    return Counter(line.strip() for line in plan.marker.read_text().splitlines() if line.strip())


@dataclass
class Audit:
    """What the NS database holds for a set of executions."""

    status: dict[int, str]
    via: dict[int, str | None]
    latency: dict[int, float]  # run-now -> recorded, seconds
    events: Counter[tuple[int, str]]

    def by_status(self) -> Counter[str]:
        return Counter(self.status.values())

    def duplicated(self, kinds: tuple[str, ...] = AGENT_KINDS + TS_KINDS) -> int:
        """Events beyond the first of each (execution, kind) for `kinds`."""
        return sum(n - 1 for (_, kind), n in self.events.items() if kind in kinds and n > 1)

    def missing(self, kinds: tuple[str, ...] = AGENT_KINDS + TS_KINDS) -> list[tuple[int, str]]:
        return [(eid, k) for eid in self.status for k in kinds if self.events[(eid, k)] == 0]

    def recorded(self, kind: str = "finished") -> int:
        return sum(1 for eid in self.status if self.events[(eid, kind)] >= 1)

    def latency_figures(self) -> dict[str, float]:
        values = sorted(self.latency.values())
        if not values:
            return {}
        return {
            "p50_s": round(statistics.median(values), 3),
            "p99_s": round(values[min(len(values) - 1, int(0.99 * len(values)))], 3),
            "max_s": round(values[-1], 3),
        }


def audit(fleet: LocalFleet, ids: set[int]) -> Audit:
    """Read the NS database (read-only) for these executions."""
    path = fleet.root / "ns" / "ns.db"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT id, status, via, created_at, recorded_at FROM executions"
        ).fetchall()
        events = db.execute("SELECT execution_id, kind FROM status_events").fetchall()
    finally:
        db.close()
    mine = [r for r in rows if r[0] in ids]
    return Audit(
        status={r[0]: r[1] for r in mine},
        via={r[0]: r[2] for r in mine},
        latency={r[0]: r[4] - r[3] for r in mine if r[4] is not None},
        events=Counter((int(e), str(k)) for e, k in events if e in ids),
    )


async def all_final(fleet: LocalFleet, ids: set[int], deadline_s: float, what: str) -> Audit:
    """Wait until every execution is final and its `finished` event recorded in the database."""
    final = {"succeeded", "failed", "timed_out", "interrupted"}

    async def probe() -> Audit | None:
        a = await asyncio.to_thread(audit, fleet, ids)
        done = len(a.status) == len(ids) and all(s in final for s in a.status.values())
        return a if done else None

    return await eventually(probe, deadline_s, what, every_s=0.5)


async def ts_outbox_depth(fleet: LocalFleet, names: list[str] | None = None) -> int:
    """Status events cached in the task servers' outboxes (their /metrics), summed."""
    total = 0.0
    for name in names or list(fleet.ts_hosts):
        total += await metric(fleet.ts_url(name), "tickle_outbox_depth")
    return int(total)


async def ts_metric_sum(fleet: LocalFleet, name: str, **labels: str) -> int:
    total = 0.0
    for ts in fleet.ts_hosts:
        total += await metric(fleet.ts_url(ts), name, **labels)
    return int(total)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self) -> float:
        return round(time.monotonic() - self.start, 3)


@pytest.fixture
def plan(tmp_path: Path) -> Planned:
    return Planned(marker=tmp_path / "marker")
