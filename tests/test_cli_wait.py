"""`tickle run --watch` waits for each execution's timeline to settle, not only its status: a task
server posts two batches of events at once, so an agent's `finished` may reach the NS before the
`agent_pulled` that carries `via` (a clean-clone CI run read `via` in between)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tickle import console
from tickle.console import NsClient
from tickle.messages import ExecutionOut, RunOut, TimelineStep

STEPS = ("created", "tickle_sent", "ts_pulled", "agent_tickled", "agent_pulled", "started",
         "finished", "cached_at_ts", "recorded")  # fmt: skip


def _execution(status: str, recorded: set[str], via: str | None = None) -> ExecutionOut:
    timeline = [TimelineStep(step=s, at=1.0 if s in recorded else None) for s in STEPS]
    return ExecutionOut(id=1, run_id=1, computer="pc1", task_server="ts1", status=status,
                        via=via, timeline=timeline)  # fmt: skip


def _run(*executions: ExecutionOut) -> RunOut:
    return RunOut(id=1, created_at=0.0, task_id=1, job_id=None, executions=list(executions))


NO_PULL = {"created", "tickle_sent", "ts_pulled", "started", "finished", "recorded"}


def test_an_execution_is_settled_once_final_with_its_pull_recorded() -> None:
    assert not _execution("running", NO_PULL).settled()
    assert not _execution("succeeded", NO_PULL).settled()  # finished before agent_pulled came
    assert _execution("succeeded", NO_PULL | {"agent_pulled"}, "poll").settled()
    assert _execution("expired", {"created"}).settled()  # never started: nothing to wait for
    assert _execution("cancelled", {"created", "agent_pulled"}).settled()


async def test_watching_a_run_waits_for_the_pull_that_came_after_finished(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: Iterator[RunOut] = iter([
        _run(_execution("running", NO_PULL)),
        _run(_execution("succeeded", NO_PULL)),
        _run(_execution("succeeded", NO_PULL | {"agent_pulled"}, "poll")),
    ])  # fmt: skip

    async def run(run_id: int) -> RunOut:
        return next(reads)

    client = NsClient(url="http://127.0.0.1:9", token="t")
    monkeypatch.setattr(client, "run", run)
    watched = await client.wait_run(1, deadline_s=10)
    assert watched.executions[0].via == "poll"


async def test_a_timeline_that_never_settles_holds_the_watch_only_a_moment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a task server gone for good may hold the agent_pulled back: the watch returns once
    # SETTLE_S passed with every execution final, not at its deadline
    monkeypatch.setattr(console, "SETTLE_S", 0.5)
    reads = 0

    async def run(run_id: int) -> RunOut:
        nonlocal reads
        reads += 1
        return _run(_execution("succeeded", NO_PULL))

    client = NsClient(url="http://127.0.0.1:9", token="t")
    monkeypatch.setattr(client, "run", run)
    watched = await asyncio.wait_for(client.wait_run(1, deadline_s=300), timeout=30)
    assert watched.executions[0].status == "succeeded"
    assert 2 <= reads <= 50  # waited past the first final read, then gave up on settling
