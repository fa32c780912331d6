"""Runs an execution's steps in order and reports status events through the durable outbox.

Each step is a command (argv, no shell) or a script (run by /bin/sh from a temporary file), in a
session of its own and in a contained tree (`containment.py`): every process it starts, however
it escapes (new session, double fork, daemon), is killed with it. A step ends when its main
process exits — what it left running gets a moment to finish writing its output, then is killed
(SIGTERM, `kill_grace_s`, SIGKILL) and the output tail says so — or at its timeout, when the whole
tree is killed the same way, or when the operator cancels it (`cancelling`). Reading the output
is bounded in time: a step never hangs on a pipe. stdout and stderr are kept apart, within
`output_max_bytes` together (`output.py`: head and tail, a marker where the middle was cut), and
their last bytes as they came (the summary). A job stops at its first failing step. Events:
`started`, `step_finished` per step of a job (with its output and times), `finished` (succeeded /
failed / timed_out, cancelled, or interrupted when the agent stops; a task's output) — each
committed to the outbox before the forwarder is woken, so none is lost if the task server is down
or the agent restarts.

Given a `localdb.WalSync` of the outbox, the events of a run are committed without a sync and
forwarded at once while their sync runs in a thread (the full-sync commit sat on the event loop
between the task's end and its `finished` going out, and between `started` and the task's start);
a job's next step starts, and the execution is marked finished in the agent's state, only once
the events before are on disk. A power
cut before that sync is as one a moment before the event: the task dies with the power, the
execution is still unfinished in the state and is reported interrupted at the next start. An
event the task server acknowledged is durable there (it answers only once synced), so the agent
may drop its copy whether or not its own sync came first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from tickle.agent.containment import Containment, TaskTree
from tickle.agent.output import CappedStream, as_text, cut_to_cap
from tickle.agent.state import AgentState
from tickle.agent.subreaper import Subreaper
from tickle.agentapi import (
    OUTPUT_MAX_BYTES,
    OUTPUT_TAIL_MAX,
    ExecutionWork,
    PullVia,
    StatusEvent,
    TaskSpec,
    encode,
)
from tickle.clock import Clock
from tickle.localdb import WalSync
from tickle.metrics import Metrics
from tickle.outbox import OutboxForwarder, new_event_id

log = logging.getLogger(__name__)

# after the main process exits, how long what it left running may keep the output open
_DRAIN_S = 2.0
# after every process of the step is killed, how long the output may take to reach its end
_EOF_S = 1.0
# the environment variable that names the execution to its task (and its processes to the agent)
EXECUTION_ID_VAR = "TICKLE_EXECUTION_ID"
# how long an execution's `started` may wait to go with its next event: a step that ends within
# it sends both in one post (one request, commit and sync at the task server and at the NS, not
# two, and none of it while the task runs: S1); a longer one's `started` goes after it
STARTED_WAIT_S = 0.25


@dataclass(frozen=True, slots=True)
class StepOutcome:
    """How one step ended: its status, exit code, output (whole within the cap, and the tail of
    both streams) and times."""

    status: str  # succeeded | failed | timed_out | cancelled
    exit_code: int | None
    output_tail: str
    stdout: str = ""
    stderr: str = ""
    started_at: float | None = None
    finished_at: float | None = None

    def output_fields(self) -> dict[str, object]:
        """What a status event carries of this step."""
        return {
            "status": self.status, "exit_code": self.exit_code, "output_tail": self.output_tail,
            "stdout": self.stdout, "stderr": self.stderr, "step_started_at": self.started_at,
        }  # fmt: skip


class Cancelled(Exception):
    """The operator cancelled the execution while it ran."""


class Executor:
    """Runs executions for one computer and queues their status events."""

    def __init__(
        self,
        computer: str,
        state: AgentState,
        forwarder: OutboxForwarder,
        metrics: Metrics,
        output_tail_bytes: int = OUTPUT_TAIL_MAX,
        output_max_bytes: int = OUTPUT_MAX_BYTES,
        work_dir: Path | None = None,
        containment: Containment | None = None,
        kill_grace_s: float = 5.0,
        task_umask: int = 0o022,
        clock: Clock = time.time,
        wal_sync: WalSync | None = None,
    ) -> None:
        """`wal_sync`: syncs the outbox's database (see the module's doc); None: each event is
        committed with a full sync."""
        self._computer = computer
        self._wal_sync = wal_sync
        self._clock = clock  # the times of its status events
        self._state = state
        self._forwarder = forwarder
        self._metrics = metrics
        self._tail_bytes = output_tail_bytes
        self._output_max = output_max_bytes
        self._work_dir = work_dir
        self.containment: Containment = containment or Subreaper()
        self._kill_grace_s = kill_grace_s
        self._task_umask = task_umask
        self._cancelling: set[int] = set()

    async def run(self, work: ExecutionWork, via: PullVia | None = None) -> StepOutcome:
        """Run every step in order, stopping at the first failure; report as it goes.

        Cancelled (the agent stops): the running step's processes are killed and the execution
        is reported interrupted at once.
        """
        # with a WalSync, each event is synced in a thread while the run goes on (see the doc)
        synced = self._emit(work.execution_id, "started", False, STARTED_WAIT_S, via=via)
        outcome = StepOutcome("succeeded", 0, "")
        last = 0
        try:
            for index, spec in enumerate(work.steps):
                last = index
                if index:  # the steps before and their output on disk before the next starts
                    await self._synced(synced)
                outcome = await self.run_step(spec, work.execution_id, index)
                log.info(
                    "execution %d step %d (%s): %s, exit %s",
                    work.execution_id, index, spec.name, outcome.status, outcome.exit_code,
                )  # fmt: skip
                if work.kind == "job":
                    synced = self._emit(
                        work.execution_id, "step_finished", step=index, **outcome.output_fields()
                    )
                if outcome.status != "succeeded":
                    break
        except asyncio.CancelledError:
            if work.execution_id in self._cancelling:  # the operator's cancel, not the agent's stop
                self._cancelling.discard(work.execution_id)
                note = "cancelled by the operator: stopped with its processes"
                self.report_ended(work.execution_id, "cancelled", last, note)
            else:
                self.report_interrupted(work.execution_id, step=last)
            raise
        # a job's steps carried their output already; a task's one step is in its `finished`
        fields = outcome.output_fields()
        if work.kind == "job":
            fields = {k: fields[k] for k in ("status", "exit_code", "output_tail")}
        synced = self._emit(work.execution_id, "finished", step=last, **fields)
        try:
            await self._synced(synced)  # the events on disk before the state says finished
        except asyncio.CancelledError:  # stopping meanwhile: `_synced` synced them on the loop
            self._finished(work.execution_id, outcome.status)
            raise
        self._finished(work.execution_id, outcome.status)
        return outcome

    def _finished(self, execution_id: int, status: str) -> None:
        self._state.mark_finished(execution_id, status)
        self._metrics.executions.labels(status=status).inc()

    def report_interrupted(self, execution_id: int, step: int | None = None) -> None:
        """Report an execution the agent stopped while it ran (it is not run again)."""
        self.report_ended(
            execution_id, "interrupted", step, "the agent stopped while this execution ran"
        )

    def report_ended(self, execution_id: int, status: str, step: int | None, note: str) -> None:
        """Report an execution ended without running to its end (interrupted, cancelled, or
        expired before it started)."""
        self._emit(execution_id, "finished", True, step=step, status=status, exit_code=None,
                   output_tail=note)  # fmt: skip
        self._state.mark_finished(execution_id, status)
        self._metrics.executions.labels(status=status).inc()

    def cancelling(self, execution_id: int) -> bool:
        """The operator cancelled this running execution: its stop is reported `cancelled`.
        False when it was being cancelled already."""
        if execution_id in self._cancelling:
            return False
        self._cancelling.add(execution_id)
        return True

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
            output = cleanup.enter_context(_Output(self._tail_bytes, self._output_max))
            started_at = time.time()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *tree.command(argv),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=output.stdout_fd,
                    stderr=output.stderr_fd,
                    start_new_session=True,  # away from the agent's session and terminal
                    cwd=self._work_dir,
                    env=env,
                    # the agent keeps its own files private (umask 077); a task gets the usual
                    umask=self._task_umask,
                )
            except OSError as exc:
                why = f"cannot start {argv[0]!r}: {exc}"
                return StepOutcome("failed", 127, why, stderr=why, started_at=started_at,
                                   finished_at=time.time())  # fmt: skip
            finally:
                output.close_write_end()  # the task holds it now
            tree.started(proc.pid)
            outcome = await self._supervise(proc, tree, output, spec.timeout_s)
            return dataclasses.replace(outcome, started_at=started_at, finished_at=time.time())

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
        stdout, stderr = output.kept()
        if timed_out:
            note = f"timed out after {timeout_s:g} s: killed it"
            if killed:
                note += f" and {_processes(killed)} it started"
            return StepOutcome("timed_out", proc.returncode, _noted(text, note), stdout,
                               _noted(stderr, note, None))  # fmt: skip
        if killed:
            log.warning("the task %d left %d processes running: killed them", proc.pid, killed)
            note = f"killed {_processes(killed)} the task left running"
            text, stderr = _noted(text, note), _noted(stderr, note, None)
        status = "succeeded" if proc.returncode == 0 else "failed"
        return StepOutcome(status, proc.returncode, text, stdout, stderr)

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

    async def _synced(self, sync: asyncio.Future[None] | None) -> None:
        """Wait for `sync` (`_emit`'s: the events committed until then on disk; the forwarder
        sent them meanwhile)."""
        if sync is None or self._wal_sync is None:
            return
        try:
            await asyncio.shield(sync)
        except asyncio.CancelledError:
            # the agent stops: on disk before the caller reports or marks anything
            self._wal_sync.sync_now()
            raise

    def _emit(
        self,
        execution_id: int,
        kind: str,
        durable: bool = False,
        within_s: float | None = None,
        /,
        **fields: object,
    ) -> asyncio.Future[None] | None:
        """Commit a status event to the outbox and wake the forwarder (`within_s`: it may wait
        that long for the next event, to go with it). With a WalSync and not `durable`, the
        commit is not synced on the loop: the sync that covers it, started now in a thread, is
        returned (for `_synced`); else the commit syncs, None."""
        event = msgspec.convert(
            {
                "event_id": new_event_id(),
                "execution_id": execution_id,
                "computer": self._computer,
                "kind": kind,
                "at": self._clock(),
                **fields,
            },
            StatusEvent,
        )
        later = self._wal_sync is not None and not durable
        self._forwarder.queue_bodies(
            [(event.event_id, encode(event).decode())], not later, within_s
        )
        if self._wal_sync is None or not later:
            return None
        sync = asyncio.ensure_future(self._wal_sync.sync())
        sync.add_done_callback(_retrieved)
        return sync


def _retrieved(sync: asyncio.Future[None]) -> None:
    """A sync's failure is raised to whoever waits for it, if anyone; not logged as unretrieved."""
    if not sync.cancelled():
        sync.exception()


class _Output:
    """A step's stdout and stderr pipes, read as they come: each stream's head and tail are kept
    (`output.py` cuts them to the cap), and the last bytes of both in arrival order."""

    def __init__(self, keep_tail: int, cap: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._cap = cap
        self._streams = [CappedStream(cap), CappedStream(cap)]
        self._tail_keep = keep_tail
        self._tail = bytearray()
        self._fds: list[int] = []
        self.write_ends: list[int] = []
        self._open = 0
        self._eof = asyncio.Event()
        for stream in self._streams:
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            self._fds.append(read_end)
            self.write_ends.append(write_end)
            self._open += 1
            self._loop.add_reader(read_end, self._read, read_end, stream)

    @property
    def stdout_fd(self) -> int:
        return self.write_ends[0]

    @property
    def stderr_fd(self) -> int:
        return self.write_ends[1]

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close_write_end()
        for fd in self._fds:
            if fd >= 0:
                self._loop.remove_reader(fd)
                os.close(fd)
        self._fds = []

    def close_write_end(self) -> None:
        for i, fd in enumerate(self.write_ends):
            if fd >= 0:
                os.close(fd)
                self.write_ends[i] = -1

    async def closed(self, within_s: float) -> bool:
        """Whether every writer closed both pipes within `within_s` (the output is complete)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._eof.wait(), within_s)
        return self._eof.is_set()

    def text(self) -> str:
        """The last bytes of stdout and stderr, in the order they came."""
        return as_text(bytes(self._tail))

    def kept(self) -> tuple[str, str]:
        """stdout and stderr as kept: together within the cap, each cut in its middle."""
        return cut_to_cap(self._streams[0], self._streams[1], self._cap)

    def _read(self, fd: int, stream: CappedStream) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._loop.remove_reader(fd)
            os.close(fd)
            self._fds[self._fds.index(fd)] = -1
            self._open -= 1
            if self._open == 0:
                self._eof.set()
            return
        stream.write(chunk)
        self._tail += chunk
        if len(self._tail) > self._tail_keep:
            del self._tail[: len(self._tail) - self._tail_keep]


def _noted(text: str, note: str, keep: int | None = OUTPUT_TAIL_MAX) -> str:
    """The output with the agent's own line at its end (the tail: within the wire's bound)."""
    line = f"[tickle] {note}\n"
    if text and not text.endswith("\n"):
        line = "\n" + line
    return (text + line) if keep is None else (text + line)[-keep:]


def _processes(n: int) -> str:
    return f"{n} process" if n == 1 else f"{n} processes"


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
