"""The executor runs steps in order, stops at the first failure, enforces timeouts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tickle.agent.executor import Executor
from tickle.agent.state import AgentState
from tickle.messages import ExecutionWork, StatusEvent, TaskSpec
from tickle.metrics import ComponentMetrics
from tickle.outbox import Outbox, OutboxForwarder


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[tuple[Executor, AgentState, Outbox]]:
    state = AgentState(tmp_path / "agent.db")
    outbox = Outbox(tmp_path / "outbox.db")
    metrics = ComponentMetrics("agent")
    unstarted = OutboxForwarder(outbox, _never_sent, metrics)  # the events stay in the outbox
    executor = Executor("agent1", state, unstarted, metrics, output_tail_bytes=64)
    yield executor, state, outbox
    outbox.close()
    state.close()


async def _never_sent(bodies: list[str]) -> list[str]:
    raise AssertionError("the forwarder is not started")


def queued(outbox: Outbox) -> list[StatusEvent]:
    return [StatusEvent.model_validate(json.loads(body)) for _, body in outbox.peek(1000)]


async def test_job_stops_at_failing_step(
    parts: tuple[Executor, AgentState, Outbox], tmp_path: Path
) -> None:
    executor, state, outbox = parts
    marker = tmp_path / "step3-ran"
    work = ExecutionWork(
        execution_id=1, computer="agent1", kind="job",
        steps=[
            TaskSpec(name="one", command=["true"]),
            TaskSpec(name="two", script="echo broken; exit 3"),
            TaskSpec(name="three", command=["touch", str(marker)]),
        ],
    )  # fmt: skip
    state.claim(1)
    outcome = await executor.run(work, "poll")
    assert outcome.status == "failed"
    assert not marker.exists()
    events = queued(outbox)
    assert [(e.kind, e.step, e.status, e.exit_code) for e in events] == [
        ("started", None, None, None),
        ("step_finished", 0, "succeeded", 0),
        ("step_finished", 1, "failed", 3),
        ("finished", 1, "failed", 3),
    ]
    assert events[-1].output_tail == "broken\n"
    assert state.unfinished() == []
    assert state.counts() == {"failed": 1}


async def test_timeout_kills_process_group_and_reports_timed_out(
    parts: tuple[Executor, AgentState, Outbox], tmp_path: Path
) -> None:
    executor, state, outbox = parts
    pidfile = tmp_path / "child.pid"
    work = ExecutionWork(
        execution_id=2, computer="agent1", kind="task",
        steps=[TaskSpec(name="slow", script=f"sleep 60 & echo $! > {pidfile}; wait",
                        timeout_s=0.5)],
    )  # fmt: skip
    state.claim(2)
    began = time.monotonic()
    outcome = await executor.run(work)
    assert time.monotonic() - began < 5.0
    assert outcome.status == "timed_out"
    finished = queued(outbox)[-1]
    assert (finished.kind, finished.status) == ("finished", "timed_out")
    child = int(pidfile.read_text())
    # the background sleep was in the killed process group: it is gone (at most a zombie)
    deadline = time.monotonic() + 2.0
    while _alive(child) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_output_tail_keeps_the_last_bytes(
    parts: tuple[Executor, AgentState, Outbox],
) -> None:
    executor, _, _ = parts
    outcome = await executor.run_step(
        TaskSpec(name="chatty", script="seq 1 1000; echo err >&2; printf '\\377'")
    )
    assert outcome.status == "succeeded"
    assert len(outcome.output_tail) <= 64
    assert outcome.output_tail.endswith("1000\nerr\n\ufffd")


async def test_command_that_cannot_start_fails_with_127(
    parts: tuple[Executor, AgentState, Outbox],
) -> None:
    executor, _, _ = parts
    outcome = await executor.run_step(TaskSpec(name="nope", command=["/nonexistent/tool"]))
    assert (outcome.status, outcome.exit_code) == ("failed", 127)
    assert "/nonexistent/tool" in outcome.output_tail


def test_claim_is_atomic_and_survives_reopen(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "agent.db")
    assert state.claim(7, "tickle") is True
    assert state.claim(7, "poll") is False
    state.close()
    reopened = AgentState(tmp_path / "agent.db")
    assert reopened.claim(7, "poll") is False
    assert reopened.unfinished() == [7]
    reopened.close()
