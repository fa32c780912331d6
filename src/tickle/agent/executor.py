"""Runs an execution's steps in order and reports status events through the durable outbox.

Each step is a command (argv, no shell) or a script (run by /bin/sh from a temporary file), in a
process group of its own so a timeout kills everything it started. The combined stdout/stderr tail
is kept. A job stops at its first failing step. Events: `started`, `step_finished` per step of a
job, `finished` (succeeded / failed / timed_out) — each committed to the outbox before the
forwarder is woken, so none is lost if the task server is down or the agent restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tickle.agent.state import AgentState
from tickle.messages import OUTPUT_TAIL_MAX, ExecutionWork, PullVia, StatusEvent, TaskSpec
from tickle.metrics import ComponentMetrics
from tickle.outbox import OutboxForwarder

log = logging.getLogger(__name__)

# after the process exits, how long an orphan that inherited the pipe may keep it open
_DRAIN_S = 2.0


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """How one step ended."""

    status: str  # succeeded | failed | timed_out
    exit_code: int | None
    output_tail: str


class Executor:
    """Runs executions for one computer and queues their status events."""

    def __init__(
        self,
        computer: str,
        state: AgentState,
        forwarder: OutboxForwarder,
        metrics: ComponentMetrics,
        output_tail_bytes: int = OUTPUT_TAIL_MAX,
        work_dir: Path | None = None,
    ) -> None:
        self._computer = computer
        self._state = state
        self._forwarder = forwarder
        self._metrics = metrics
        self._tail_bytes = output_tail_bytes
        self._work_dir = work_dir

    async def run(self, work: ExecutionWork, via: PullVia | None = None) -> StepOutcome:
        """Run every step in order, stopping at the first failure; report as it goes."""
        self._emit(work.execution_id, "started", via=via)
        outcome = StepOutcome("succeeded", 0, "")
        last = 0
        for index, spec in enumerate(work.steps):
            last = index
            outcome = await self.run_step(spec)
            log.info(
                "execution %d step %d (%s): %s, exit %s",
                work.execution_id, index, spec.name, outcome.status, outcome.exit_code,
            )  # fmt: skip
            if work.kind == "job":
                self._emit(
                    work.execution_id, "step_finished", step=index, status=outcome.status,
                    exit_code=outcome.exit_code, output_tail=outcome.output_tail,
                )  # fmt: skip
            if outcome.status != "succeeded":
                break
        self._emit(
            work.execution_id, "finished", step=last, status=outcome.status,
            exit_code=outcome.exit_code, output_tail=outcome.output_tail,
        )  # fmt: skip
        self._state.mark_finished(work.execution_id, outcome.status)
        self._metrics.executions.labels(status=outcome.status).inc()
        return outcome

    def report_interrupted(self, execution_id: int) -> None:
        """Report an execution the agent was running when it died (it is not run again)."""
        self._emit(execution_id, "finished", status="interrupted", exit_code=None,
                   output_tail="the agent stopped while this execution ran")  # fmt: skip
        self._state.mark_finished(execution_id, "interrupted")
        self._metrics.executions.labels(status="interrupted").inc()

    async def run_step(self, spec: TaskSpec) -> StepOutcome:
        """Run one command or script with its timeout; kill its process group on timeout."""
        script_path: str | None = None
        try:
            if spec.command is not None:
                argv = list(spec.command)
            else:
                assert spec.script is not None
                script_path = self._write_script(spec.script)
                argv = ["/bin/sh", script_path]
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # its own process group: a timeout kills it all
                    cwd=self._work_dir,
                )
            except OSError as exc:
                return StepOutcome("failed", 127, f"cannot start {argv[0]!r}: {exc}")
            return await self._supervise(proc, spec.timeout_s)
        finally:
            if script_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(script_path)

    async def _supervise(self, proc: asyncio.subprocess.Process, timeout_s: float) -> StepOutcome:
        assert proc.stdout is not None
        reader = asyncio.create_task(_read_tail(proc.stdout, self._tail_bytes))
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            timed_out = True
            _kill_group(proc)
            await proc.wait()
        except BaseException:  # cancelled (agent stopping): leave no process behind
            _kill_group(proc)
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            raise
        try:
            tail = await asyncio.wait_for(asyncio.shield(reader), _DRAIN_S)
        except TimeoutError:
            _kill_group(proc)  # something it started still holds the pipe
            tail = await reader
        text = tail.decode(errors="replace")[-OUTPUT_TAIL_MAX:]
        if timed_out:
            return StepOutcome("timed_out", proc.returncode, text)
        status = "succeeded" if proc.returncode == 0 else "failed"
        return StepOutcome(status, proc.returncode, text)

    def _write_script(self, script: str) -> str:
        fd, path = tempfile.mkstemp(prefix="tickle-task-", suffix=".sh", dir=self._work_dir)
        with os.fdopen(fd, "w") as f:
            f.write(script)
        return path

    def _emit(self, execution_id: int, kind: str, **fields: object) -> None:
        event = StatusEvent.model_validate(
            {
                "event_id": str(uuid.uuid4()),
                "execution_id": execution_id,
                "computer": self._computer,
                "kind": kind,
                "at": time.time(),
                **fields,
            }
        )
        self._forwarder.queue([event])


async def _read_tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    """Read to EOF, keeping only the last `keep` bytes."""
    tail = bytearray()
    while chunk := await stream.read(65536):
        tail += chunk
        if len(tail) > keep:
            del tail[: len(tail) - keep]
    return bytes(tail)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
