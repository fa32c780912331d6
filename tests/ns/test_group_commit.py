"""Group commit (tickle.ns.group_commit): the writes that arrive while one group is written are
the next group, one call for all; each request gets its own outcome, and a failing item fails
only its own request."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from tests.reliability import record
from tickle.ns.group_commit import GroupCommit


class Refused(Exception):
    pass


class Writes:
    """A write that records its groups; `hold` keeps the first group in the write until released."""

    def __init__(self, hold: bool = False) -> None:
        self.groups: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()

    def __call__(self, items: Sequence[str]) -> list[str | BaseException]:
        self.groups.append(list(items))
        self.started.set()
        assert self.release.wait(10), "the test never released the write"
        if "broken" in items:
            raise RuntimeError("the database failed")
        return [Refused(i) if i.startswith("refused") else f"done {i}" for i in items]


async def test_requests_arriving_while_a_group_is_written_are_the_next_group() -> None:
    writes = Writes(hold=True)
    group: GroupCommit[str, str] = GroupCommit("test", writes)
    first = asyncio.create_task(group.submit("a0"))
    assert await asyncio.to_thread(writes.started.wait, 10)
    rest = [asyncio.create_task(group.submit(f"a{i}")) for i in range(1, 10)]
    await asyncio.sleep(0)  # each is queued: submit queues before it waits
    writes.release.set()
    assert await first == "done a0"
    assert await asyncio.gather(*rest) == [f"done a{i}" for i in range(1, 10)]
    assert writes.groups == [["a0"], [f"a{i}" for i in range(1, 10)]]


async def _one_group_with(middle: str) -> tuple[list[str | BaseException], Writes]:
    """Submit a, `middle`, c in one turn (one group); their outcomes and the writes."""
    writes = Writes()
    group: GroupCommit[str, str] = GroupCommit("test", writes)
    outcomes = await asyncio.gather(
        group.submit("a"), group.submit(middle), group.submit("c"), return_exceptions=True
    )
    assert outcomes[0] == "done a"
    assert outcomes[2] == "done c"
    return outcomes, writes


async def test_a_refusal_is_raised_to_its_own_request_only() -> None:
    outcomes, writes = await _one_group_with("refused b")
    assert isinstance(outcomes[1], Refused)
    assert writes.groups == [["a", "refused b", "c"]]


async def test_a_group_that_fails_is_written_again_one_by_one_and_fails_only_the_bad_one() -> None:
    outcomes, writes = await _one_group_with("broken")
    assert isinstance(outcomes[1], RuntimeError)
    assert writes.groups == [["a", "broken", "c"], ["a"], ["broken"], ["c"]]
    record(
        case="a group commit that fails (NS registrations)",
        done="the write of a group of 3 raises for one of them",
        outcome="the group written again one by one: the 2 others answered, only the failing "
        "one gets its error",
        sent=3,
        recorded=2,
    )
    group: GroupCommit[str, str] = GroupCommit("test", writes)
    with pytest.raises(RuntimeError, match="the database failed"):  # alone: raised as it is
        await group.submit("broken")


async def test_groups_are_bounded() -> None:
    writes = Writes()
    group: GroupCommit[str, str] = GroupCommit("test", writes, max_group=3)
    await asyncio.gather(*(group.submit(f"a{i}") for i in range(7)))
    assert [len(g) for g in writes.groups] == [3, 3, 1]


async def test_a_request_cancelled_while_its_group_is_written_leaves_the_others_answered() -> None:
    writes = Writes(hold=True)
    group: GroupCommit[str, str] = GroupCommit("test", writes)
    first = asyncio.create_task(group.submit("a0"))
    assert await asyncio.to_thread(writes.started.wait, 10)
    rest = [asyncio.create_task(group.submit(name)) for name in ("a1", "gone", "a3")]
    await asyncio.sleep(0)  # each is queued
    rest[1].cancel()  # its client went away: the write goes on, nobody is told
    writes.release.set()
    assert await first == "done a0"
    assert await rest[0] == "done a1"
    assert await rest[2] == "done a3"
    assert rest[1].cancelled()
    assert writes.groups == [["a0"], ["a1", "gone", "a3"]]
