"""Task server failover: when the agent's task server stays unreachable, move to the next one.

With more than one URL in `task_servers`, the agent checks every `failover_check_interval_s` that
its task server still answers (GET /health, only when no other call reached it in that time).
Once every contact — health checks, pulls, policy fetches, status events — has failed for
`failover_after_s`, it registers with the next reachable task server of the list (the NS moves the
computer there, and that task server pulls the computer's pending work), then pulls at once.
Each round tries every other task server once, so the loop is bounded by the check interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from tickle.agent.ts_client import NotRegistered, TaskServerClient

log = logging.getLogger(__name__)


class Failover:
    """Watches the task server's answers and fails over after `after_s` of silence."""

    def __init__(
        self,
        client: TaskServerClient,
        after_s: float,
        check_interval_s: float,
        on_moved: Callable[[], Awaitable[object]],
    ) -> None:
        self._client = client
        self._after_s = after_s
        self._interval_s = check_interval_s
        self._on_moved = on_moved
        self._task: asyncio.Task[None] | None = None
        self.failovers = 0
        self.last_failover_at: float | None = None

    @property
    def enabled(self) -> bool:
        return self._after_s > 0 and self._client.has_alternatives

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check_once(self) -> bool:
        """One round: health check when quiet, fail over when due; True when the agent moved."""
        last = self._client.last_answer_at
        if last is None or time.monotonic() - last >= self._interval_s:
            await self._client.check()
        if self._client.unreachable_for() < self._after_s:
            return False
        try:
            enrollment = await self._client.fail_over()
        except NotRegistered as exc:
            log.warning("failover found no reachable task server (%s); next try in %.0fs",
                        exc, self._interval_s)  # fmt: skip
            return False
        if enrollment is None:
            return False
        self.failovers += 1
        self.last_failover_at = time.time()
        log.warning("failed over to task server %s", enrollment.ts_name)
        await self._on_moved()
        return True

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.check_once()
            except Exception:
                log.exception("failover check failed")
