"""Group commit: writes that arrive together are done together, one transaction for all.

Each request hands its item to a `GroupCommit` and waits for its own result. While one group is
written (off the event loop), the items that arrive meanwhile queue, and are the next group: no
delay is added to a lone request, and under load the groups grow by themselves. On SQLite, where
writers take turns, a fleet registering at once then waits for a few commits instead of queueing
for the write lock one registration at a time.

A group whose write raises is written again one item at a time, so an item that fails takes
only its own request down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from tickle.serving import on_route_thread

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# the most items in one transaction (a transaction holds SQLite's write lock while it runs)
MAX_GROUP = 500


class GroupCommit(Generic[T, R]):
    """Runs `write` (synchronous, in the threadpool) on the items submitted together.

    `write` gets the items in their order of arrival and returns one outcome per item, in order:
    its result, or an exception raised to that item's request (a refusal).
    """

    def __init__(
        self,
        name: str,
        write: Callable[[Sequence[T]], Sequence[R | BaseException]],
        max_group: int = MAX_GROUP,
    ) -> None:
        self._name = name
        self._write = write
        self._max_group = max_group
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """Write `item` with whatever else arrives meanwhile; its result, or raises its
        exception."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            group = self._queue[: self._max_group]
            del self._queue[: self._max_group]
            items = [item for item, _ in group]
            try:
                outcomes: Sequence[R | BaseException] = await on_route_thread(self._write, items)
            except Exception as exc:
                if len(group) == 1:
                    outcomes = [exc]
                else:
                    log.warning("%s: a group of %d failed; each written alone", self._name,
                                len(group), exc_info=True)  # fmt: skip
                    outcomes = [await self._alone(item) for item in items]
            for (_, future), outcome in zip(group, outcomes, strict=True):
                if future.done():  # its request was cancelled (the client went away)
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    async def _alone(self, item: T) -> R | BaseException:
        try:
            (outcome,) = await on_route_thread(self._write, [item])
        except Exception as exc:
            return exc
        return outcome
