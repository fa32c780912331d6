"""Runs an execution's steps in order and reports status events through the durable outbox.

Each step is a command (argv, no shell) or a script (run by /bin/sh from a temporary file), in a
session of its own and in a contained tree (`containment.py`): every process it starts, however
it escapes (new session, double fork, daemon), is killed with it. A step ends when its main
process exits — what it left running gets a moment to finish writing its output, then is killed
(SIGTERM, `kill_grace_s`, SIGKILL) and the output tail says so — or at its timeout, when the whole
tree is killed the same way. Reading the output is bounded in time: a step never hangs on a pipe.
The combined stdout/stderr tail is kept. A job stops at its first failing step. Events:
`started`, `step_finished` per step of a job, `finished` (succeeded / failed / timed_out, or
interrupted when the agent stops) — each committed to the outbox before the forwarder is woken, so
none is lost if the task server is down or the agent restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tickle.agent.containment import Containment, TaskTree
from tickle.agent.state import AgentState
from tickle.agent.subreaper import Subreaper
from tickle.clock import Clock
from tickle.messages import OUTPUT_TAIL_MAX, ExecutionWork, PullVia, StatusEvent, TaskSpec
from tickle.metrics import ComponentMetrics
from tickle.outbox import OutboxForwarder

log = logging.getLogger(__name__)

# after the main process exits, how long what it left running may keep the output open
_DRAIN_S = 2.0
# after every process of the step is killed, how long the output may take to reach its end
_EOF_S = 1.0
# the environment variable that names the execution to its task (and its processes to the agent)
EXECUTION_ID_VAR = "TICKLE_EXECUTION_ID"


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
        containment: Containment | None = None,
        kill_grace_s: float = 5.0,
        task_umask: int = 0o022,
        clock: Clock = time.time,
    ) -> None:
        self._computer = computer
        self._clock = clock  # the times of its status events
        self._state = state
        self._forwarder = forwarder
        self._metrics = metrics
        self._tail_bytes = output_tail_bytes
        self._work_dir = work_dir
        self.containment: Containment = containment or Subreaper()
        self._kill_grace_s = kill_grace_s
        self._task_umask = task_umask

    async def run(self, work: ExecutionWork, via: PullVia | None = None) -> StepOutcome:
        """Run every step in order, stopping at the first failure; report as it goes.

        Cancelled (the agent stops): the running step's processes are killed and the execution
        is reported interrupted at once.
        """
        self._emit(work.execution_id, "started", via=via)
        outcome = StepOutcome("succeeded", 0, "")
        last = 0
        try:
            for index, spec in enumerate(work.steps):
                last = index
                outcome = await self.run_step(spec, work.execution_id, index)
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
        except asyncio.CancelledError:
            self.report_interrupted(work.execution_id, step=last)
            raise
        self._emit(
            work.execution_id, "finished", step=last, status=outcome.status,
            exit_code=outcome.exit_code, output_tail=outcome.output_tail,
        )  # fmt: skip
        self._state.mark_finished(work.execution_id, outcome.status)
        self._metrics.executions.labels(status=outcome.status).inc()
        return outcome

    def report_interrupted(self, execution_id: int, step: int | None = None) -> None:
        """Report an execution the agent stopped while it ran (it is not run again)."""
        self._emit(execution_id, "finished", step=step, status="interrupted", exit_code=None,
                   output_tail="the agent stopped while this execution ran")  # fmt: skip
        self._state.mark_finished(execution_id, "interrupted")
        self._metrics.executions.labels(status="interrupted").inc()

    async def run_step(
        self, spec: TaskSpec, execution_id: int | None = None, index: int = 0
    ) -> StepOutcome:
        """Run one command or script with its timeout, in a contained tree; kill what it leaves."""
        env: dict[str, str] | None = None
        marker: str | None = None
        if execution_id is not None:
            marker = f"{EXECUTION_ID_VAR}={execution_id}"
            env = {**os.environ, EXECUTION_ID_VAR: str(execution_id)}
        label = f"{'step' if execution_id is None else execution_id}-{index}"
        with contextlib.ExitStack() as cleanup:  # in reverse: output, tree, script
            argv = self._argv(spec, cleanup)
            try:
                tree = self.containment.open(label, marker)
            except OSError as exc:
                return StepOutcome("failed", None, f"cannot contain the task: {exc}")
            cleanup.callback(tree.release)
            output = cleanup.enter_context(_Output(self._tail_bytes))
            try:
                proc = await asyncio.create_subprocess_exec(
                    *tree.command(argv),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=output.write_end,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # away from the agent's session and terminal
                    cwd=self._work_dir,
                    env=env,
                    # the agent keeps its own files private (umask 077); a task gets the usual
                    umask=self._task_umask,
                )
            except OSError as exc:
                return StepOutcome("failed", 127, f"cannot start {argv[0]!r}: {exc}")
            finally:
                output.close_write_end()  # the task holds it now
            tree.started(proc.pid)
            return await self._supervise(proc, tree, output, spec.timeout_s)

    async def _supervise(
        self, proc: asyncio.subprocess.Process, tree: TaskTree, output: _Output, timeout_s: float
    ) -> StepOutcome:
        try:
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
                timed_out = False
            except TimeoutError:
                timed_out = True
            if not timed_out:
                # what the main process left running may finish writing its output, for a moment
                await output.closed(_DRAIN_S)
            killed = await self._kill(proc, tree)
        except asyncio.CancelledError:  # the agent is stopping: leave no process behind
            await asyncio.shield(self._kill(proc, tree))
            raise
        if not await output.closed(_EOF_S):
            log.warning("the output of %s stays open after its processes died", proc.pid)
        text = output.text()[-OUTPUT_TAIL_MAX:]
        if timed_out:
            note = f"timed out after {timeout_s:g} s: killed it"
            if killed:
                note += f" and {_processes(killed)} it started"
            return StepOutcome("timed_out", proc.returncode, _noted(text, note))
        if killed:
            log.warning("the task %d left %d processes running: killed them", proc.pid, killed)
            text = _noted(text, f"killed {_processes(killed)} the task left running")
        status = "succeeded" if proc.returncode == 0 else "failed"
        return StepOutcome(status, proc.returncode, text)

    async def _kill(self, proc: asyncio.subprocess.Process, tree: TaskTree) -> int:
        """Kill the step's whole tree; how many processes besides the main one."""
        killed = await tree.kill(self._kill_grace_s)
        try:
            await asyncio.wait_for(proc.wait(), _EOF_S)
        except TimeoutError:
            log.error("the main process %d of a task survived SIGKILL", proc.pid)
        return killed

    def _argv(self, spec: TaskSpec, cleanup: contextlib.ExitStack) -> list[str]:
        if spec.command is not None:
            return list(spec.command)
        assert spec.script is not None
        fd, path = tempfile.mkstemp(prefix="tickle-task-", suffix=".sh", dir=self._work_dir)
        cleanup.callback(_unlink_quietly, path)
        with os.fdopen(fd, "w") as f:
            f.write(spec.script)
        return ["/bin/sh", path]

    def _emit(self, execution_id: int, kind: str, **fields: object) -> None:
        event = StatusEvent.model_validate(
            {
                "event_id": str(uuid.uuid4()),
                "execution_id": execution_id,
                "computer": self._computer,
                "kind": kind,
                "at": self._clock(),
                **fields,
            }
        )
        self._forwarder.queue([event])


class _Output:
    """A step's output pipe: read as it comes, the last bytes kept."""

    def __init__(self, keep: int) -> None:
        self._fd, self.write_end = os.pipe()
        os.set_blocking(self._fd, False)
        self._keep = keep
        self._tail = bytearray()
        self._eof = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._read)

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_write_end()
        if not self._eof.is_set():
            self._loop.remove_reader(self._fd)
        os.close(self._fd)

    def close_write_end(self) -> None:
        if self.write_end >= 0:
            os.close(self.write_end)
            self.write_end = -1

    async def closed(self, within_s: float) -> bool:
        """Whether every writer closed the pipe within `within_s` (the output is complete)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._eof.wait(), within_s)
        return self._eof.is_set()

    def text(self) -> str:
        return self._tail.decode(errors="replace")

    def _read(self) -> None:
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._loop.remove_reader(self._fd)
            self._eof.set()
            return
        self._tail += chunk
        if len(self._tail) > self._keep:
            del self._tail[: len(self._tail) - self._keep]


def _noted(text: str, note: str) -> str:
    """The output tail with the agent's own line at its end (within the wire's bound)."""
    line = f"[tickle] {note}\n"
    if text and not text.endswith("\n"):
        line = "\n" + line
    return (text + line)[-OUTPUT_TAIL_MAX:]


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
