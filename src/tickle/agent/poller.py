"""Pulls tasks from the task server — on a tickle, on the poll timer, or on "check now".

When tickles are blocked or lost the agent still checks back every Task Request Interval, spread
by jitter (uniform ± poll_jitter_fraction of the interval) so a fleet does not poll in the same
second. The interval comes from the policy the task server hands down with every pull; a changed
policy re-arms the timer. Each execution a pull returns is claimed atomically before it runs, so a
tickle-triggered pull racing a poll runs it once.

When the policy says so (the NS's `long_poll` setting on, and this agent cannot be tickled: CEM,
or tickle-unreachable) the agent also holds one long-poll open to its task server, answered as
soon as work, a cancel or new settings arrive for it (a pull via `long_poll`). It re-arms the
long-poll after a short random pause; after a failure, it tries again at a random moment of a
20 s window (retries.LONG_POLL: all the agents of a restarted task server come back at an even
rate, not together), never sooner than a busy task server's Retry-After; the poll timer keeps
running under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field

from tickle.agent import retries
from tickle.agent.executor import Executor
from tickle.agent.state import AgentState
from tickle.agent.ts_client import TaskServerClient
from tickle.agentapi import AgentPolicy, AgentTasks, ExecutionWork, PolicyVia, PullVia
from tickle.httpbase import retry_after_s
from tickle.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class PullResult:
    """What one pull returned and which of those executions this pull started."""

    via: PullVia
    executions: list[int] = field(default_factory=list)
    started: list[int] = field(default_factory=list)


def poll_delay(policy: AgentPolicy) -> float:
    """The Task Request Interval with jitter: uniform ± poll_jitter_fraction of it."""
    interval = float(policy.task_request_interval_s)
    jitter = max(0.0, min(policy.poll_jitter_fraction, 0.9))
    return interval * (1.0 + random.uniform(-jitter, jitter))


class Poller:
    """The poll timer and the one place a pull happens."""

    def __init__(
        self,
        client: TaskServerClient,
        state: AgentState,
        executor: Executor,
        metrics: Metrics,
        default_policy: AgentPolicy,
    ) -> None:
        self._client = client
        self._state = state
        self._executor = executor
        self._metrics = metrics
        self.policy = state.policy() or default_policy
        client.settings_version = self.policy.settings_version
        self._rearm = asyncio.Event()
        self._timer: asyncio.Task[None] | None = None
        self._long_poll: asyncio.Task[None] | None = None
        self.long_poll_failures = 0
        self._background: set[asyncio.Task[object]] = set()
        self._running: dict[int, asyncio.Task[object]] = {}
        self.last_pull_at: float | None = None
        self.last_poll_at: float | None = None
        self.last_error: str | None = None
        self.next_poll_at: float | None = None
        self._failures = 0
        self._retry_after_s = 0.0

    def start(self) -> None:
        """Arm the poll timer (and the long-poll, when the policy says so)."""
        self._timer = asyncio.create_task(self._poll_loop())
        self._arm_long_poll()

    @property
    def long_polling(self) -> bool:
        return self._long_poll is not None and not self._long_poll.done()

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop polling; give running executions `grace_s` to finish, then kill them.

        A killed execution's processes are killed with it and it is reported interrupted.
        """
        tasks = [t for t in (self._timer, self._long_poll, *self._background) if t is not None]
        self._timer = self._long_poll = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        running = list(self._running.values())
        if running and grace_s > 0:
            await asyncio.wait(running, timeout=grace_s)
        for task in running:
            task.cancel()
        for task in running:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def running(self) -> list[int]:
        return sorted(self._running)

    def trigger(self, via: PullVia) -> None:
        """Pull in the background now (a tickle arrived)."""
        task: asyncio.Task[object] = asyncio.create_task(self.pull_quietly(via))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def pull(self, via: PullVia) -> PullResult:
        """Pull this agent's tasks, apply the policy that comes with them, run what is new."""
        self._metrics.pulls.labels(via=via).inc()
        if via == "poll":
            self._metrics.polls.inc()
            self.last_poll_at = time.time()
        return self.take(await self._client.tasks(via), via)

    def take(self, answer: AgentTasks, via: PullVia) -> PullResult:
        """Apply what a pull returned: its policy, its cancels; run what is new."""
        self.last_pull_at = time.time()
        self.last_error = None
        self._failures = 0
        self.apply_policy(answer.policy)
        result = PullResult(via=via)
        cancel = set(answer.cancel)
        for execution_id in answer.cancel:
            self._cancel(execution_id, via)
        now = time.time()
        for work in answer.executions:
            result.executions.append(work.execution_id)
            if work.execution_id in cancel:
                continue
            if not self._state.claim(work.execution_id, via):
                continue
            if work.expires_at is not None and now > work.expires_at:
                # its run expired before it could start here: it never starts
                self._executor.report_ended(work.execution_id, "expired", None,
                                            "expired before the agent could start it")  # fmt: skip
                continue
            result.started.append(work.execution_id)
            self._start(work, via)
        if result.executions:
            log.info("pull via %s: %s, started %s", via, result.executions, result.started)
        return result

    async def refresh_policy(self, via: PolicyVia = "refresh") -> AgentPolicy:
        """Fetch and apply the policy alone (never tasks)."""
        policy = await self._client.policy(via)
        self.apply_policy(policy)
        return policy

    def apply_policy(self, policy: AgentPolicy, force: bool = False) -> None:
        """Store a policy; re-arm the poll timer when it changed.

        An older settings version is ignored: answers to requests that were under way when newer
        settings arrived can come back late. `force` (a new registration) takes any version.
        """
        if policy == self.policy:
            return
        if (
            not force
            and self.policy is not None
            and (policy.settings_version < self.policy.settings_version)
        ):
            log.debug("ignoring policy version %d < %d", policy.settings_version,
                      self.policy.settings_version)  # fmt: skip
            return
        log.info(
            "policy version %d: task request interval %ds, jitter %.2f",
            policy.settings_version, policy.task_request_interval_s, policy.poll_jitter_fraction,
        )  # fmt: skip
        self.policy = policy
        self._client.settings_version = policy.settings_version  # told on every contact
        self._state.save_policy(policy)
        self._rearm.set()
        if self._timer is not None:  # started: the long-poll follows the policy
            self._arm_long_poll()

    def next_delay(self) -> float:
        return poll_delay(self.policy)

    async def _poll_loop(self) -> None:
        while True:
            self._rearm.clear()
            delay = self.next_delay()
            if self._failures:
                # the last pull failed (task server down?): check back sooner than the interval
                # (no sooner than the task server asked, when it was too busy: Retry-After)
                retry = retries.PULL.wait(self._failures - 1, self._retry_after_s)
                delay = min(delay, retry)
            self.next_poll_at = time.time() + delay
            try:
                await asyncio.wait_for(self._rearm.wait(), delay)
                continue  # the policy changed: start over with the new interval
            except TimeoutError:
                pass
            await self.pull_quietly("poll")

    def _arm_long_poll(self) -> None:
        """Hold a long-poll open when the policy says so; stop it when it no longer does."""
        if self.policy.long_poll and not self.long_polling:
            log.info("long-poll on (timeout %ds)", self.policy.long_poll_timeout_s)
            self._long_poll = asyncio.create_task(self._long_poll_loop())
        elif not self.policy.long_poll and self._long_poll is not None:
            log.info("long-poll off: polling")
            self._long_poll.cancel()  # maybe ourselves: it ends at its next pause
            self._long_poll = None

    async def _long_poll_loop(self) -> None:
        """One long-poll at a time, re-armed after a short random pause; every failure backs
        off (with jitter, capped), so the loop never spins."""
        while True:
            try:
                answer = await self._client.wait_for_tasks(self.policy.long_poll_timeout_s)
            except Exception as exc:
                # no sooner than a busy task server asked (Retry-After)
                delay = retries.LONG_POLL.wait(self.long_poll_failures, retry_after_s(exc))
                self.long_poll_failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("long-poll failed: %s; again in %.1fs", self.last_error, delay)
                await asyncio.sleep(delay)
                continue
            self.long_poll_failures = 0
            if answer is not None:
                self._metrics.pulls.labels(via="long_poll").inc()
                self.take(answer, "long_poll")
            await asyncio.sleep(random.uniform(*retries.LONG_POLL_REARM_S))

    async def pull_quietly(self, via: PullVia) -> object:
        """Pull; a failure is logged and makes the next poll come sooner, not raised."""
        try:
            return await self.pull(via)
        except Exception as exc:
            self._failures += 1
            self._retry_after_s = retry_after_s(exc)
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("pull via %s failed: %s", via, self.last_error)
            return None

    def _cancel(self, execution_id: int, via: PullVia) -> None:
        """The operator cancelled it: never start it here; stop it (with every process it
        started) if it runs. Its end is reported once: by the stop, or here if it never ran."""
        task = self._running.get(execution_id)
        if task is not None:
            if self._executor.cancelling(execution_id):  # a later pull repeats the cancel
                log.info("execution %d cancelled: stopping it", execution_id)
                task.cancel()
        elif self._state.claim(execution_id, via):
            self._executor.report_ended(execution_id, "cancelled", None,
                                        "cancelled before the agent started it")  # fmt: skip

    def _start(self, work: ExecutionWork, via: PullVia) -> None:
        task: asyncio.Task[object] = asyncio.create_task(self._run(work, via))
        self._running[work.execution_id] = task
        task.add_done_callback(lambda _: self._running.pop(work.execution_id, None))

    async def _run(self, work: ExecutionWork, via: PullVia) -> object:
        try:
            return await self._executor.run(work, via)
        except asyncio.CancelledError:
            log.warning("execution %d interrupted: the agent stops", work.execution_id)
            raise
        except Exception:
            log.exception("execution %d failed in the agent", work.execution_id)
            return None
