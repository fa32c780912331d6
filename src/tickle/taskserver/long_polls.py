"""The agents' long-polls: one waiting request per agent that cannot be tickled, answered as soon
as something arrives for it.

An agent in CEM mode, or one its tickles do not reach, may hold one long-poll open when the NS's
`long_poll` setting is on: it waits here (an asyncio future keyed by the agent's name, no thread,
no task of its own) until work, a cancel or new settings arrive for that agent, or until its
timeout, and the agent re-arms it. A second long-poll of the same agent replaces the first (which
returns empty). At most `max_long_polls` wait at once; one more is refused (503) and its agent
backs off. It is still a pull: nothing is ever sent to the agent unasked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Literal

from tickle.metrics import ComponentMetrics
from tickle.taskserver.refusal import Refused

log = logging.getLogger(__name__)

# why a long-poll ended: something arrived for its agent, it timed out, a newer one replaced it
Outcome = Literal["woken", "timeout", "replaced"]


class LongPolls:
    """The waiting long-polls of this task server's agents."""

    def __init__(self, metrics: ComponentMetrics, max_waiting: int) -> None:
        self._metrics = metrics
        self._max_waiting = max_waiting
        self._waiting: dict[str, asyncio.Future[Outcome]] = {}
        self._closed = False

    def __len__(self) -> int:
        return len(self._waiting)

    def waiting(self, name: str) -> bool:
        return name in self._waiting

    async def wait(self, name: str, timeout_s: float) -> Outcome:
        """Wait until something arrives for `name` (woken), `timeout_s` passes, or a newer
        long-poll of the same agent replaces this one."""
        if self._closed:  # stopping: the agent re-arms at the next task server
            return "timeout"
        older = self._waiting.pop(name, None)
        if older is not None and not older.done():
            older.set_result("replaced")
        elif len(self._waiting) >= self._max_waiting:
            raise Refused(
                503, f"this task server holds {self._max_waiting} long-polls already: poll"
            )
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting[name] = future
        self._metrics.long_polls_waiting.set(len(self._waiting))
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            return "timeout"
        finally:
            if self._waiting.get(name) is future:
                del self._waiting[name]
            self._metrics.long_polls_waiting.set(len(self._waiting))

    def wake(self, names: Iterable[str]) -> int:
        """Answer the long-polls of these agents now; how many were waiting."""
        woken = 0
        for name in names:
            future = self._waiting.pop(name, None)
            if future is not None and not future.done():
                future.set_result("woken")
                woken += 1
        if woken:
            self._metrics.long_polls_woken.inc(woken)
            self._metrics.long_polls_waiting.set(len(self._waiting))
        return woken

    def wake_all(self) -> int:
        """Answer every waiting long-poll now (new settings)."""
        return self.wake(list(self._waiting))

    def close(self) -> None:
        """Answer every waiting long-poll (empty), and any later one at once: the server stops."""
        self._closed = True
        for future in self._waiting.values():
            with contextlib.suppress(asyncio.InvalidStateError):
                future.set_result("timeout")
        self._waiting.clear()
        self._metrics.long_polls_waiting.set(0)
