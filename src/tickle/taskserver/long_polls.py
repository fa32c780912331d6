"""The agents' long-polls: one waiting request per agent that cannot be tickled, answered as soon
as something arrives for it.

An agent in CEM mode, or one its tickles do not reach, may hold one long-poll open when the NS's
`long_poll` setting is on: it waits here (an asyncio future keyed by the agent's name, no thread,
no task of its own) until work, a cancel or new settings arrive for that agent, or until its
timeout, and the agent re-arms it. The long-polls woken together are answered together: `respond`
makes all their answers at once (one read of the work cache, one commit of their events). A
second long-poll of the same agent replaces the first (which returns empty); one whose client
went away is dropped at once (its answer would be lost, and the work marked pulled). At most
`max_long_polls` wait at once; one more is refused (503) and its agent backs off. It is still a
pull: nothing is ever sent to the agent unasked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from tickle.messages import AgentTasks
from tickle.metrics import ComponentMetrics
from tickle.taskserver.refusal import Refused

log = logging.getLogger(__name__)

# the answers of the long-polls of these agents, woken together
Respond = Callable[[list[str]], Awaitable[dict[str, AgentTasks]]]


class LongPolls:
    """The waiting long-polls of this task server's agents."""

    def __init__(self, metrics: ComponentMetrics, max_waiting: int) -> None:
        self._metrics = metrics
        self._max_waiting = max_waiting
        self._waiting: dict[str, asyncio.Future[AgentTasks | None]] = {}
        # set by the agents' pulls; without it a woken long-poll returns empty (and its agent,
        # re-arming, finds what arrived at once)
        self.respond: Respond | None = None
        self._closed = False
        self._answering: set[asyncio.Task[None]] = set()  # woken long-polls being answered

    def __len__(self) -> int:
        return len(self._waiting)

    def waiting(self, name: str) -> bool:
        return name in self._waiting

    async def wait(
        self,
        name: str,
        timeout_s: float,
        receive: Callable[[], Awaitable[Any]] | None = None,
    ) -> AgentTasks | None:
        """The answer made when something arrives for `name`; None when `timeout_s` passes
        first, a newer long-poll of the same agent replaces this one, or the client goes away
        (`receive`: the request's ASGI receive, which says so)."""
        if self._closed:  # stopping: the agent re-arms at the next task server
            return None
        older = self._waiting.pop(name, None)
        if older is not None and not older.done():
            older.set_result(None)
        elif len(self._waiting) >= self._max_waiting:
            raise Refused(
                503, f"this task server holds {self._max_waiting} long-polls already: poll"
            )
        future: asyncio.Future[AgentTasks | None] = asyncio.get_running_loop().create_future()
        self._waiting[name] = future
        self._metrics.long_polls_waiting.set(len(self._waiting))
        watch = None if receive is None else asyncio.ensure_future(_disconnected(receive))
        if watch is not None:
            watch.add_done_callback(lambda _: self._gone(name, future))
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            return None
        finally:
            if watch is not None:
                watch.cancel()
            if self._waiting.get(name) is future:
                del self._waiting[name]
            self._metrics.long_polls_waiting.set(len(self._waiting))

    def _gone(self, name: str, future: asyncio.Future[AgentTasks | None]) -> None:
        """The client of `name`'s long-poll went away (or its request ended): drop it."""
        if self._waiting.get(name) is future:
            del self._waiting[name]
            self._metrics.long_polls_waiting.set(len(self._waiting))
        if not future.done():
            future.set_result(None)

    def wake(self, names: Iterable[str]) -> int:
        """Answer the long-polls of these agents now (their answers are made together, at once,
        on the event loop); how many were waiting."""
        woken = {n: f for n in names if (f := self._waiting.pop(n, None)) is not None}
        if not woken:
            return 0
        self._metrics.long_polls_woken.inc(len(woken))
        self._metrics.long_polls_waiting.set(len(self._waiting))
        task = asyncio.get_running_loop().create_task(self._answer(woken))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)
        return len(woken)

    async def _answer(self, woken: dict[str, asyncio.Future[AgentTasks | None]]) -> None:
        answers: dict[str, AgentTasks] = {}
        if self.respond is not None:
            try:
                answers = await self.respond(list(woken))
            except Exception:
                log.exception("answering %d woken long-polls failed: they return empty", len(woken))
        for name, future in woken.items():
            if not future.done():
                future.set_result(answers.get(name))

    def wake_all(self) -> int:
        """Answer every waiting long-poll now (new settings)."""
        return self.wake(list(self._waiting))

    def close(self) -> None:
        """Answer every waiting long-poll (empty), and any later one at once: the server stops."""
        self._closed = True
        for future in self._waiting.values():
            with contextlib.suppress(asyncio.InvalidStateError):
                future.set_result(None)
        self._waiting.clear()
        self._metrics.long_polls_waiting.set(0)


async def _disconnected(receive: Callable[[], Awaitable[Any]]) -> None:
    """Return when the request's client goes away (ASGI `http.disconnect`)."""
    for _ in range(1024):  # the (empty) body's parts come first, then the disconnect
        if (await receive())["type"] == "http.disconnect":
            return
    await asyncio.get_running_loop().create_future()  # a client that never stops: not watched
