"""The executor runs steps in order, stops at the first failure, enforces timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tickle.agent import executor as executor_module
from tickle.agent.executor import Executor
from tickle.agent.state import AgentState
from tickle.localdb import WalSync
from tickle.messages import ExecutionWork, StatusEvent, TaskSpec
from tickle.metrics import ComponentMetrics
from tickle.outbox import Outbox, OutboxForwarder

from .conftest import alive, dies, script


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
    assert await dies(child)


async def test_the_task_knows_its_execution_id(
    parts: tuple[Executor, AgentState, Outbox],
) -> None:
    executor, state, _ = parts
    state.claim(3)
    outcome = await executor.run(script(3, "echo id=$TICKLE_EXECUTION_ID"))
    assert outcome.output_tail == "id=3\n"


async def test_what_the_task_leaves_in_its_group_is_killed_when_it_exits(
    parts: tuple[Executor, AgentState, Outbox], tmp_path: Path
) -> None:
    executor, _, _ = parts
    pidfile = tmp_path / "child.pid"
    # output redirected: nothing holds the pipe, the step ends at once and the child is left
    text = f"sleep 60 > /dev/null 2>&1 & echo $! > {pidfile}; echo done"
    outcome = await executor.run_step(TaskSpec(name="leaves", script=text))
    assert (outcome.status, outcome.output_tail) == ("succeeded", "done\n")
    child = int(pidfile.read_text())
    assert await dies(child)


async def test_output_held_open_by_a_process_the_step_cannot_see_does_not_hang_it(
    parts: tuple[Executor, AgentState, Outbox], tmp_path: Path
) -> None:
    """In-process the executor is no subreaper: a child in a new session escapes its tree.

    (`tickle agent` adopts and kills it: tests/faults/test_contained_tasks.py.) Reading the
    output is bounded in time all the same.
    """
    executor, _, _ = parts
    pidfile = tmp_path / "child.pid"
    text = f"setsid sh -c 'echo $$ > {pidfile}; exec sleep 60' &\nwhile [ ! -s {pidfile} ]; do :; done; echo x"
    began = time.monotonic()
    try:
        outcome = await asyncio.wait_for(
            executor.run_step(TaskSpec(name="held", script=text)), 10.0
        )
    finally:
        with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
    assert time.monotonic() - began < 5.0  # the drain (2 s) and the end of output (1 s), bounded
    assert (outcome.status, outcome.output_tail) == ("succeeded", "x\n")


async def test_a_stopped_execution_is_killed_and_reported_interrupted_at_once(
    parts: tuple[Executor, AgentState, Outbox], tmp_path: Path
) -> None:
    executor, state, outbox = parts
    pidfile = tmp_path / "child.pid"
    state.claim(4)
    running = asyncio.create_task(executor.run(script(4, f"sleep 60 & echo $! > {pidfile}; wait")))
    while not pidfile.exists() or not pidfile.read_text().strip():
        await asyncio.sleep(0.01)
    running.cancel()  # what the agent's stop does
    with pytest.raises(asyncio.CancelledError):
        await running
    assert await dies(int(pidfile.read_text()))
    finished = queued(outbox)[-1]
    assert (finished.kind, finished.status) == ("finished", "interrupted")
    assert state.unfinished() == []


async def test_a_step_stopped_while_what_it_left_holds_the_output_kills_that_too(
    parts: tuple[Executor, AgentState, Outbox], tmp_path: Path
) -> None:
    executor, _, _ = parts
    main, child = tmp_path / "main.pid", tmp_path / "child.pid"
    # the main process exits at once; its child holds the output: the step is draining it
    text = f"echo $$ > {main}; sleep 60 & echo $! > {child}; exit 0"
    step = asyncio.create_task(executor.run_step(TaskSpec(name="drains", script=text)))
    deadline = time.monotonic() + 5.0
    while not (child.exists() and child.read_text().strip()) or alive(int(main.read_text())):
        assert time.monotonic() < deadline, "the main process never exited"
        await asyncio.sleep(0.01)
    step.cancel()  # the agent stops during the drain
    with pytest.raises(asyncio.CancelledError):
        await step
    assert await dies(int(child.read_text()))


async def test_a_task_runs_with_the_task_umask_not_the_agents_private_one(
    parts: tuple[Executor, AgentState, Outbox],
) -> None:
    executor, state, _ = parts
    state.claim(7)
    old = os.umask(0o077)  # as the agent runs (statedir.make_private)
    try:
        outcome = await executor.run(script(7, "umask"))
    finally:
        os.umask(old)
    assert outcome.status == "succeeded"
    assert outcome.output_tail == "0022\n"


async def test_output_tail_keeps_the_last_bytes_and_each_stream_is_kept_apart(
    parts: tuple[Executor, AgentState, Outbox],
) -> None:
    executor, _, _ = parts
    outcome = await executor.run_step(
        TaskSpec(name="chatty", script="seq 1 1000; echo err >&2; printf '\\377'")
    )
    assert outcome.status == "succeeded"
    assert len(outcome.output_tail) <= 64
    assert outcome.output_tail.endswith("\ufffd") or outcome.output_tail.endswith("err\n")
    assert outcome.stdout == "".join(f"{i}\n" for i in range(1, 1001)) + "\ufffd"
    assert outcome.stderr == "err\n"


async def test_output_over_the_cap_keeps_head_and_tail_with_a_marker(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "agent.db")
    outbox = Outbox(tmp_path / "outbox.db")
    metrics = ComponentMetrics("agent")
    forwarder = OutboxForwarder(outbox, _never_sent, metrics)
    executor = Executor("agent1", state, forwarder, metrics, output_max_bytes=64 * 1024)
    # 3 MiB on stdout: the first and the last lines are numbered, the middle is filler
    script = "echo FIRST; head -c 3145728 /dev/zero | tr '\\0' x; echo; echo LAST; echo oops >&2"
    outcome = await executor.run_step(TaskSpec(name="big", script=script))
    outbox.close()
    state.close()
    assert outcome.status == "succeeded"
    assert outcome.stderr == "oops\n"  # small: kept whole, its unused share goes to stdout
    assert outcome.stdout.startswith("FIRST\nxxx")
    assert outcome.stdout.endswith("xxx\nLAST\n")
    kept = 64 * 1024 - len("oops\n")
    total = len("FIRST\n") + 3145728 + len("\nLAST\n")
    assert f"\n[tickle] ... {total - kept} bytes cut here ...\n" in outcome.stdout
    assert len(outcome.stdout) == kept + len(f"\n[tickle] ... {total - kept} bytes cut here ...\n")


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


class _GatedSync(WalSync):
    """A WalSync whose fsyncs wait for `gate` (in the sync's thread)."""

    def __init__(self, path: Path) -> None:
        super().__init__([path])
        self.gate = threading.Event()

    def _sync_files(self) -> None:
        assert self.gate.wait(30)
        super()._sync_files()


async def test_events_go_to_the_task_server_before_the_outbox_sync_and_finish_after_it(
    tmp_path: Path,
) -> None:
    """The run's events are forwarded while the outbox's sync runs (it is not waited for on the
    event loop before the post); the execution is marked finished only once it completed."""
    state = AgentState(tmp_path / "agent.db")
    outbox = Outbox(tmp_path / "outbox.db")
    metrics = ComponentMetrics("agent")
    sent: list[str] = []
    both_sent = asyncio.Event()

    async def send(bodies: list[str]) -> list[str]:
        ids = [json.loads(b)["event_id"] for b in bodies]
        sent.extend(json.loads(b)["kind"] for b in bodies)
        if "finished" in sent:
            both_sent.set()
        return ids

    forwarder = OutboxForwarder(outbox, send, metrics)
    forwarder.start()
    wal_sync = _GatedSync(tmp_path / "outbox.db")
    executor = Executor("agent1", state, forwarder, metrics, wal_sync=wal_sync)
    state.claim(1)
    running = asyncio.create_task(executor.run(script(1, "true")))
    try:
        await asyncio.wait_for(both_sent.wait(), 30)
        assert sent == ["started", "finished"]
        assert not running.done()
        assert state.unfinished() == [1]  # not before its events are on disk
        wal_sync.gate.set()
        outcome = await asyncio.wait_for(running, 30)
        assert outcome.status == "succeeded"
        assert state.unfinished() == []
        assert wal_sync.syncs >= 1
    finally:
        wal_sync.gate.set()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await forwarder.stop()
        outbox.close()
        state.close()


class _Posts:
    """A task server's event posts, as the forwarder sends them: the kinds of each batch."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.posted = asyncio.Event()

    async def send(self, bodies: list[str]) -> list[str]:
        self.batches.append([json.loads(b)["kind"] for b in bodies])
        self.posted.set()
        return [json.loads(b)["event_id"] for b in bodies]


@contextlib.asynccontextmanager
async def _forwarding(tmp_path: Path) -> AsyncIterator[tuple[Executor, AgentState, _Posts]]:
    state = AgentState(tmp_path / "agent.db")
    outbox = Outbox(tmp_path / "outbox.db")
    metrics = ComponentMetrics("agent")
    posts = _Posts()
    forwarder = OutboxForwarder(outbox, posts.send, metrics)
    forwarder.start()
    assert await forwarder.drained(30)  # its look at what a run before left: nothing
    executor = Executor("agent1", state, forwarder, metrics)
    try:
        yield executor, state, posts
    finally:
        await forwarder.stop()
        outbox.close()
        state.close()


async def test_a_quick_steps_started_goes_with_its_finished_in_one_post(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executor_module, "STARTED_WAIT_S", 30.0)  # however loaded the machine
    async with _forwarding(tmp_path) as (executor, state, posts):
        state.claim(1)
        outcome = await asyncio.wait_for(executor.run(script(1, "true")), 30)
        assert outcome.status == "succeeded"
        await asyncio.wait_for(posts.posted.wait(), 30)
        assert posts.batches == [["started", "finished"]]


async def test_a_longer_steps_started_goes_while_it_runs(tmp_path: Path) -> None:
    release = tmp_path / "release"
    async with _forwarding(tmp_path) as (executor, state, posts):
        state.claim(1)
        waits = f"until [ -e {release} ]; do sleep 0.02; done"  # bounded: the step's timeout
        running = asyncio.create_task(executor.run(script(1, waits, timeout_s=30)))
        try:
            sent_at = time.monotonic()
            await asyncio.wait_for(posts.posted.wait(), 30)
            assert posts.batches == [["started"]]
            assert time.monotonic() - sent_at >= executor_module.STARTED_WAIT_S * 0.9
            assert not running.done()
            posts.posted.clear()
            release.touch()
            outcome = await asyncio.wait_for(running, 30)
            assert outcome.status == "succeeded"
            await asyncio.wait_for(posts.posted.wait(), 30)
            assert posts.batches == [["started"], ["finished"]]
        finally:
            release.touch()
            with contextlib.suppress(asyncio.CancelledError):
                await running


async def test_a_jobs_next_step_waits_for_the_steps_before_on_disk(tmp_path: Path) -> None:
    """The step_finished events (with their output) are on disk before the next step starts."""
    state = AgentState(tmp_path / "agent.db")
    outbox = Outbox(tmp_path / "outbox.db")
    metrics = ComponentMetrics("agent")
    forwarder = OutboxForwarder(outbox, _never_sent, metrics)
    wal_sync = _GatedSync(tmp_path / "outbox.db")
    executor = Executor("agent1", state, forwarder, metrics, wal_sync=wal_sync)
    marker = tmp_path / "second-ran"
    work = ExecutionWork(
        execution_id=2, computer="agent1", kind="job",
        steps=[
            TaskSpec(name="one", command=["true"]),
            TaskSpec(name="two", command=["touch", str(marker)]),
        ],
    )  # fmt: skip
    state.claim(2)
    running = asyncio.create_task(executor.run(work))
    try:
        for _ in range(3000):  # the first step's end queued (bounded: 30 s)
            if [e.kind for e in queued(outbox)] == ["started", "step_finished"]:
                break
            await asyncio.sleep(0.01)
        assert [e.kind for e in queued(outbox)] == ["started", "step_finished"]
        assert not marker.exists()
        wal_sync.gate.set()
        outcome = await asyncio.wait_for(running, 30)
        assert outcome.status == "succeeded"
        assert marker.exists()
        assert [e.kind for e in queued(outbox)][-1] == "finished"
        assert state.unfinished() == []
    finally:
        wal_sync.gate.set()
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        outbox.close()
        state.close()
