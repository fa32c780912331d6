"""Several NS processes on one PostgreSQL database: exactly one dispatches tickles at a time, a
run-now posted to any of them is tickled and recorded once, and a killed dispatcher is replaced."""

from __future__ import annotations

import asyncio
import base64
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import eventually, metric
from tests.reliability import record
from tickle import wire
from tickle.console import NsClient, timeline_times
from tickle.messages import (
    FINAL_STATUSES,
    RunCreate,
    RunOut,
    TaskCreate,
    TaskServerCredentials,
)
from tickle.ns.database import DISPATCHER_LOCK_KEY
from tickle.testing.localfleet import AgentSpec

from .conftest import PgServer, TwoNsFactory, TwoNsFleet, dispatcher_active

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
TAKEOVER_BOUND_S = 15.0  # the standby retries the lock every 5 s


def lock_holders(postgres: PgServer, database: str) -> int:
    """How many sessions hold the dispatcher advisory lock (pg_locks splits the bigint key)."""
    with postgres.connect(database) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = %s AND objid = %s AND objsubid = 1",
            (DISPATCHER_LOCK_KEY >> 32, DISPATCHER_LOCK_KEY & 0xFFFFFFFF),
        ).fetchone()
    return int(row[0]) if row else 0


async def sample_dispatchers(two: TwoNsFleet, samples: int = 10) -> list[tuple[float | None, ...]]:
    """Both processes' `tickle_dispatcher_active`, read together `samples` times."""
    seen = []
    for _ in range(samples):
        seen.append(
            tuple(
                await asyncio.gather(
                    dispatcher_active(two.fleet.ns_url), dispatcher_active(two.ns2.url)
                )
            )
        )
        await asyncio.sleep(0.05)
    return seen


async def run_via(url: str, token: str, computer: str, marker: Path, tag: str) -> RunOut:
    """Run now through the NS at `url`; the task appends `tag` to `marker`."""
    async with NsClient(url, token) as ns:
        task = await ns.add_task(
            TaskCreate(name=tag, command=["sh", "-c", f"echo {tag} >> {marker}"], timeout_s=30)
        )
        return await ns.run_now(RunCreate(task_id=task.id, computers=[computer]))


async def wait_final(url: str, token: str, run_id: int, deadline_s: float) -> RunOut:
    async def probe() -> RunOut | None:
        async with NsClient(url, token) as ns:
            run = await ns.run(run_id)
        return run if all(e.status in FINAL_STATUSES for e in run.executions) else None

    return await eventually(probe, deadline_s, f"run {run_id} to finish")


def event_counts(postgres: PgServer, database: str, execution_id: int) -> dict[str, int]:
    with postgres.connect(database) as conn:
        rows = conn.execute(
            "SELECT kind, count(*) FROM status_events WHERE execution_id = %s GROUP BY kind",
            (execution_id,),
        ).fetchall()
    return {str(kind): int(n) for kind, n in rows}


def database_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


async def test_one_dispatcher_and_a_run_now_posted_to_the_other_ns_is_recorded_once(
    two_ns_fleet: TwoNsFactory, postgres: PgServer, tmp_path: Path
) -> None:
    two = await two_ns_fleet(["ts1"], [AgentSpec("a1", ["ts1"])])
    db = database_of(two.database_url)
    assert set(await sample_dispatchers(two)) == {(1.0, 0.0)}
    assert lock_holders(postgres, db) == 1
    assert "became the active tickle dispatcher" in two.fleet.log_tail("ns", 500)
    assert "became the active tickle dispatcher" not in two.ns2.log_text()

    marker = tmp_path / "ran"
    run = await run_via(two.ns2.url, two.fleet.admin_token, "a1", marker, "via-ns2")
    run = await wait_final(two.ns2.url, two.fleet.admin_token, run.id, 20)
    execution = run.executions[0]
    assert execution.status == "succeeded", execution
    assert execution.via == "tickle"  # the interval is 1800 s: only a tickle explains this
    assert timeline_times(execution)["tickle_sent"] is not None
    # the dispatching process tickled, the one that took the run-now did not
    assert await metric(two.fleet.ns_url, "tickle_tickles_sent_total", kind="tasks") >= 1
    assert await metric(two.ns2.url, "tickle_tickles_sent_total", kind="tasks") == 0
    assert marker.read_text().split() == ["via-ns2"]

    async def every_kind() -> dict[str, int] | None:
        counts = event_counts(postgres, db, execution.id)
        return counts if {"agent_pulled", "started", "finished"} <= set(counts) else None

    counts = await eventually(every_kind, 10, "the execution's events in PostgreSQL")
    assert set(counts.values()) == {1}, counts
    assert set(await sample_dispatchers(two)) == {(1.0, 0.0)}


@pytest.mark.faults
async def test_sigkilled_dispatcher_is_replaced_by_the_other_ns_within_bound(
    two_ns_fleet: TwoNsFactory, postgres: PgServer, tmp_path: Path
) -> None:
    two = await two_ns_fleet(["ts1"], [AgentSpec("a1", ["ts1"])])
    db = database_of(two.database_url)
    assert set(await sample_dispatchers(two, 3)) == {(1.0, 0.0)}

    killed_at = time.monotonic()
    two.fleet.kill("ns")

    async def ns2_dispatches() -> bool:
        return await dispatcher_active(two.ns2.url) == 1

    await eventually(ns2_dispatches, TAKEOVER_BOUND_S, "ns2 to take over dispatching", 0.05)
    takeover_s = time.monotonic() - killed_at
    holders = lock_holders(postgres, db)

    marker = tmp_path / "ran"
    created = time.monotonic()
    run = await run_via(two.ns2.url, two.fleet.admin_token, "a1", marker, "after-takeover")
    run = await wait_final(two.ns2.url, two.fleet.admin_token, run.id, 20)
    recorded_s = time.monotonic() - created
    execution = run.executions[0]
    tickles_ns2 = await metric(two.ns2.url, "tickle_tickles_sent_total", kind="tasks")
    counts = event_counts(postgres, db, execution.id)
    ran = marker.read_text().split() if marker.exists() else []
    ok = (
        execution.status == "succeeded"
        and execution.via == "tickle"
        and tickles_ns2 >= 1
        and holders == 1
        and ran == ["after-takeover"]
    )
    record(
        case="PostgreSQL: dispatching NS killed",
        done="two NS processes on one PostgreSQL database; SIGKILL the one holding the"
        " dispatcher lock; one run-now posted to the other after it takes over",
        outcome="pass" if ok else "fail",
        sent=1,
        recorded=1 if execution.status in FINAL_STATUSES else 0,
        duplicated=sum(n - 1 for n in counts.values()),
        tried=1,
        takeover_s=round(takeover_s, 3),
        takeover_bound_s=TAKEOVER_BOUND_S,
        run_now_to_recorded_s=round(recorded_s, 3),
        lock_holders_after=holders,
    )
    assert holders == 1
    assert execution.status == "succeeded", execution
    assert execution.via == "tickle"
    assert tickles_ns2 >= 1  # the survivor sent the tickle
    assert ran == ["after-takeover"]
    assert set(counts.values()) == {1}, counts


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.queue.put_nowait(data)


async def test_work_tickled_by_a_killed_dispatcher_but_never_pulled_is_tickled_again_by_the_next(
    two_ns_fleet: TwoNsFactory, postgres: PgServer
) -> None:
    """The dispatcher dies while its tickle goes unanswered: the process that takes over tickles
    for that work again instead of leaving it to the task server's next poll."""
    two = await two_ns_fleet([], [])
    loop = asyncio.get_running_loop()
    transport, udp = await loop.create_datagram_endpoint(_Datagrams, local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        async with (
            NsClient(two.ns2.url, two.fleet.admin_token) as ns,
            aiohttp.ClientSession() as http,
        ):
            # a task server that hears tickles but never pulls (as if it were briefly stopped)
            async with http.post(two.ns2.url + "/api/ts/register", json={
                "enrollment_secret": two.fleet.enrollment_secret, "name": "deaf-ts",
                "tickle_host": "127.0.0.1", "tickle_port": port, "api_url": "http://127.0.0.1:9",
            }) as resp:  # fmt: skip
                creds = TaskServerCredentials.model_validate(await resp.json())
            headers = {"Authorization": f"Bearer {creds.token}"}
            async with http.post(two.ns2.url + "/api/ts/agents/register", headers=headers,
                                 json={"name": "c1", "tickle_host": "127.0.0.1"}) as resp:  # fmt: skip
                assert resp.status == 200, await resp.text()
            guard = wire.TickleGuard({creds.ns_id: base64.b64decode(creds.tickle_key)})
            task = await ns.add_task(TaskCreate(name="t", command=["true"]))
            run = await ns.run_now(RunCreate(task_id=task.id, computers=["c1"]))
            first = guard.check(await asyncio.wait_for(udp.queue.get(), 10))
            assert first.kind is wire.Kind.TASKS

            async def stamped() -> bool:
                execution = (await ns.run(run.id)).executions[0]
                return timeline_times(execution)["tickle_sent"] is not None

            # the dispatcher wrote down that it tickled: nobody will tickle again unless told to
            await eventually(stamped, 10, "the first tickle to be stamped on the execution")
            two.fleet.kill("ns")
            killed_at = time.monotonic()
            end = killed_at + TAKEOVER_BOUND_S + 5
            while True:
                try:
                    data = await asyncio.wait_for(
                        udp.queue.get(), max(0.01, end - time.monotonic())
                    )
                except TimeoutError:
                    pytest.fail("the NS that took over never tickled for the unpulled work")
                again = guard.check(data)
                # the dead dispatcher's resends count on from its first seq; another process's
                # sequence starts at its own start time (ns2 started about a second later)
                if not 0 <= again.seq - first.seq < 1000:
                    break
            retickled_s = time.monotonic() - killed_at
            execution = (await ns.run(run.id)).executions[0]
    finally:
        transport.close()
    assert again.kind is wire.Kind.TASKS
    assert await dispatcher_active(two.ns2.url) == 1
    assert await metric(two.ns2.url, "tickle_tickles_sent_total", kind="tasks") >= 1
    assert execution.status == "pending"
    # the timeline keeps the first tickle's time
    assert timeline_times(execution)["tickle_sent"] is not None
    assert retickled_s < TAKEOVER_BOUND_S + 5
