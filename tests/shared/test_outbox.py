"""The durable outbox keeps events across restarts and forwards them once the next hop is back."""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path

import pytest

from tickle.backoff import Backoff
from tickle.http import ApiError
from tickle.messages import StatusEvent
from tickle.metrics import ComponentMetrics
from tickle.outbox import FORWARDED_KEEP_S, Outbox, OutboxForwarder, new_event_id


def test_events_survive_reopening_and_duplicates_are_ignored(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    assert box.put("e1", '{"a":1}')
    assert not box.put("e1", '{"a":1}')
    box.put_many([("e2", "{}"), ("e3", "{}")])
    box.close()
    box = Outbox(tmp_path / "o.db")
    assert [eid for eid, _ in box.peek()] == ["e1", "e2", "e3"]
    box.remove(["e2"])
    assert box.depth() == 2
    box.close()


def test_what_waits_goes_group_by_group_each_group_in_the_order_it_came(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    # a fan-out's events come hop by hop: every execution's first, then every second
    box.put_many([("t7", "{}", 7), ("t5", "{}", 5), ("t6", "{}", 6)])
    box.put_many([("p6", "{}", 6), ("p5", "{}", 5), ("free", "{}"), ("p7", "{}", 7)])
    assert [eid for eid, _ in box.peek(limit=4)] == ["free", "t5", "p5", "t6"]
    assert [eid for eid, _ in box.peek(limit=4, exclude={"t5", "p5"})] == ["free", "t6", "p6", "t7"]
    box.remove(["free", "t5", "p5"])
    box.put_many([("f5", "{}", 5)])  # a group's later event joins it, wherever it waits
    assert [eid for eid, _ in box.peek()] == ["f5", "t6", "p6", "t7", "p7"]
    assert box.depth() == 5
    box.close()
    box = Outbox(tmp_path / "o.db")  # kept across a restart
    assert [eid for eid, _ in box.peek(limit=2)] == ["f5", "t6"]
    box.close()


def test_an_outbox_without_groups_keeps_its_waiting_events_in_their_order(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "o.db", isolation_level=None)
    # the layout before events had groups
    db.execute("CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT"
               " NULL UNIQUE, body TEXT NOT NULL, queued_at REAL NOT NULL, forwarded_at REAL)")  # fmt: skip
    now = time.time()
    db.executemany("INSERT INTO outbox (event_id, body, queued_at, forwarded_at) VALUES (?, ?, ?, ?)",
                   [("e1", "{}", now, None), ("done", "", now, now), ("e2", "{}", now, None)])  # fmt: skip
    db.close()
    box = Outbox(tmp_path / "o.db")
    box.put_many([("g1", "{}", 1)])
    assert [eid for eid, _ in box.peek()] == ["e1", "e2", "g1"]
    assert (box.depth(), box.put("done", "{}")) == (3, False)
    box.close()


def test_dropping_acknowledged_events_is_not_synced_but_queueing_still_is(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path / "o.db")
    statements: list[str] = []
    box._db.set_trace_callback(statements.append)
    box.put_many([("e1", "{}"), ("e2", "{}")])
    queued, statements[:] = list(statements), []
    box.remove(["e1"])
    dropped, statements[:] = list(statements), []
    box.put("e3", "{}")
    assert "PRAGMA synchronous" not in " ".join(queued)
    assert dropped[0] == "PRAGMA synchronous=NORMAL"
    assert dropped[-1] == "PRAGMA synchronous=FULL"
    assert box._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL for what follows
    box.close()
    box = Outbox(tmp_path / "o.db")  # the drop is committed all the same
    assert [eid for eid, _ in box.peek()] == ["e2", "e3"]
    assert not box.put("e1", "{}"), "a forwarded event's id is remembered"
    box.close()


async def test_forwarder_retries_until_the_next_hop_accepts(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    up = asyncio.Event()
    delivered: list[str] = []
    attempts = 0

    async def send(bodies: list[str]) -> list[str]:
        nonlocal attempts
        attempts += 1
        if not up.is_set():
            raise ConnectionError("next hop down")
        delivered.extend(bodies)
        return [b.split(":")[0] for b in bodies]

    box.put_many([(f"e{i}", f"e{i}:body") for i in range(5)])
    metrics = ComponentMetrics("test")
    fwd = OutboxForwarder(
        box, send, metrics, Backoff(base_s=0.01, max_s=0.05, tries=None, jitter=0)
    )
    fwd.start()
    try:
        async with asyncio.timeout(5):
            while attempts < 3:
                await asyncio.sleep(0.01)
        assert delivered == []
        assert box.depth() == 5
        up.set()
        fwd.wake()
        assert await fwd.drained(5)
    finally:
        await fwd.stop()
    assert sorted(delivered) == sorted(f"e{i}:body" for i in range(5))
    assert metrics.outbox_depth._value.get() == 0
    box.close()


async def _refused_once_then_reopened(tmp_path: Path, error: Exception) -> tuple[bool, int]:
    """A send refused with `error` under a 60 s backoff, then `reopen`: (drained within 3 s,
    sends)."""
    box = Outbox(tmp_path / "o.db")
    sends = 0

    async def send(bodies: list[str]) -> list[str]:
        nonlocal sends
        sends += 1
        if sends == 1:
            raise error
        return [b.split(":")[0] for b in bodies]

    box.put_many([("e1", "e1:body")])
    backoff = Backoff(base_s=60.0, max_s=60.0, tries=None, jitter=0)
    fwd = OutboxForwarder(box, send, ComponentMetrics("test"), backoff)
    fwd.start()
    try:
        async with asyncio.timeout(5):
            while sends < 1:
                await asyncio.sleep(0.01)
        fwd.reopen()  # the next hop answered another request of ours
        drained = await fwd.drained(3)
    finally:
        await fwd.stop()
        box.close()
    return drained, sends


async def test_a_failed_send_s_backoff_ends_when_the_next_hop_answers_again(
    tmp_path: Path,
) -> None:
    drained, sends = await _refused_once_then_reopened(tmp_path, ConnectionError("hop away"))
    assert drained
    assert sends == 2


async def test_a_retry_after_the_next_hop_asked_for_is_waited_out_whatever_it_answers(
    tmp_path: Path,
) -> None:
    busy = ApiError(429, "busy", "http://next-hop/api", retry_after_s=60)
    drained, sends = await _refused_once_then_reopened(tmp_path, busy)
    assert not drained
    assert sends == 1


async def test_only_accepted_events_leave_the_outbox(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.put_many([("keep", "keep"), ("go", "go")])
    calls = 0

    async def send(bodies: list[str]) -> list[str]:
        nonlocal calls
        calls += 1
        return ["go"] if calls == 1 else list(bodies)

    fwd = OutboxForwarder(box, send, ComponentMetrics("t"), Backoff(base_s=0.01, tries=None))
    fwd.start()
    try:
        assert await fwd.drained(5)
    finally:
        await fwd.stop()
    assert calls >= 2
    assert box.depth() == 0
    box.close()


async def test_the_oldest_waiting_event_s_age_is_exposed(tmp_path: Path) -> None:
    # what the alert on status events stuck in an outbox reads (monitoring/rules/tickle.rules.yml)
    box = Outbox(tmp_path / "o.db")
    metrics = ComponentMetrics("t")
    OutboxForwarder(box, _refuse, metrics, Backoff(base_s=10, tries=None))  # never started

    def age() -> float | None:  # as a scrape reads it
        return metrics.registry.get_sample_value("tickle_outbox_oldest_age_seconds")

    assert age() == 0  # empty: nothing waits
    box.put_many([("old", "{}")])
    box._db.execute("UPDATE outbox SET queued_at = queued_at - 600")
    box.put_many([("new", "{}")])
    assert 600 <= age() < 660
    box.remove(["old"])
    assert 0 <= age() < 60
    box.remove(["new"])
    assert age() == 0
    box.close()
    assert age() == 0  # closed at shutdown: no error


async def _refuse(bodies: list[str]) -> list[str]:
    raise ConnectionError("next hop down")


def _status(n: int) -> StatusEvent:
    return StatusEvent(
        event_id=str(uuid.UUID(int=n + 1)), execution_id=n + 1, computer="pc1", kind="started",
        at=1.0,
    )  # fmt: skip


class _Hop:
    """A next hop that accepts everything, noting the size of each batch."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.accepted: set[str] = set()

    async def send(self, bodies: list[str]) -> list[str]:
        ids = [StatusEvent.model_validate_json(b).event_id for b in bodies]
        self.batches.append(len(ids))
        self.accepted.update(ids)
        return ids


async def _burst(path: Path, linger_s: float) -> list[int]:
    """300 events queued one a turn, as requests bring them: the batches forwarded."""
    box, hop = Outbox(path), _Hop()
    fwd = OutboxForwarder(box, hop.send, ComponentMetrics("t"), batch_size=500,
                          linger_s=linger_s, busy_events=5)  # fmt: skip
    fwd.start()
    try:
        for n in range(300):
            fwd.queue([_status(n)], durable=False)  # (no fsync each: the burst stays short)
            await asyncio.sleep(0)
        assert await fwd.drained(10)
    finally:
        await fwd.stop()
        box.close()
    assert len(hop.accepted) == 300
    return hop.batches


async def test_a_burst_of_events_is_forwarded_in_a_few_large_batches(tmp_path: Path) -> None:
    eager = await _burst(tmp_path / "eager.db", linger_s=0)
    lingering = await _burst(tmp_path / "lingering.db", linger_s=1.0)
    assert len(eager) >= 100  # the next hop answers at once: nearly every event goes alone
    # the first few, until the burst shows (busy_events), then one batch per linger
    assert len(lingering) <= 15, lingering


async def test_an_event_queued_when_not_busy_is_forwarded_without_lingering(
    tmp_path: Path,
) -> None:
    box, hop = Outbox(tmp_path / "o.db"), _Hop()
    fwd = OutboxForwarder(box, hop.send, ComponentMetrics("t"), linger_s=60, busy_events=20)
    fwd.start()
    try:
        fwd.queue([_status(1)])
        assert await fwd.drained(10)
        fwd.queue([_status(2)])  # within the linger of the first send, but alone
        assert await fwd.drained(10), "a lone event waited for the linger"
    finally:
        await fwd.stop()
    assert hop.batches == [1, 1]
    box.close()


async def test_events_that_may_wait_go_with_the_next_sent_or_alone_within_their_bound(
    tmp_path: Path,
) -> None:
    # a task server's own hop reports ride with its agent's next event: one post to the NS,
    # not one per hop (S1: four posts per run, two of them hop reports)
    box, hop = Outbox(tmp_path / "o.db"), _Hop()
    fwd = OutboxForwarder(box, hop.send, ComponentMetrics("t"))
    fwd.start()
    try:
        assert await fwd.drained(5)
        fwd.queue([_status(1)], within_s=60)
        fwd.queue([_status(2)], within_s=60)
        for _ in range(5):  # turns of the event loop: the forwarder would have sent them
            await asyncio.sleep(0)
        assert hop.batches == []
        fwd.queue([_status(3)])
        assert await fwd.drained(10)
        assert hop.batches == [3]
        fwd.queue([_status(4)], within_s=0.05)  # nothing else comes: alone, within its bound
        assert await fwd.drained(10)
        assert hop.batches == [3, 1]
    finally:
        await fwd.stop()
    box.close()


class _HeldHop:
    """A next hop that holds each post until let go, noting the events of each as it comes."""

    def __init__(self, fail_first: bool = False) -> None:
        self.posts: list[list[str]] = []
        self.came = asyncio.Event()
        self.go = asyncio.Event()
        self.failed = asyncio.Event()
        self._fail_first = fail_first

    async def send(self, bodies: list[str]) -> list[str]:
        ids = [StatusEvent.model_validate_json(b).event_id for b in bodies]
        self.posts.append(ids)
        self.came.set()
        await self.go.wait()
        if self._fail_first and len(self.posts) == 1:
            self.failed.set()  # (the forwarder sees the error in this same step of its task)
            raise ConnectionError("next hop down")
        return ids

    async def next_post(self, within_s: float) -> bool:
        """Whether a post comes within `within_s` (bounded: False once it has passed)."""
        self.came.clear()
        try:
            async with asyncio.timeout(within_s):
                await self.came.wait()
        except TimeoutError:
            return False
        return True


async def _second_event_while_the_first_is_on_its_way(
    tmp_path: Path, in_flight: int
) -> tuple[_HeldHop, bool]:
    box, hop = Outbox(tmp_path / f"o{in_flight}.db"), _HeldHop()
    fwd = OutboxForwarder(box, hop.send, ComponentMetrics("t"), in_flight=in_flight)
    fwd.start()
    try:
        fwd.queue([_status(1)])  # a run's `started`
        assert await hop.next_post(5)
        fwd.queue([_status(2)])  # its `finished`, while `started`'s answer is awaited
        went_at_once = await hop.next_post(0.5)
        hop.go.set()
        assert await fwd.drained(5)
    finally:
        await fwd.stop()
        box.close()
    return hop, went_at_once


async def test_an_event_goes_while_the_batch_before_awaits_its_answer_given_two_in_flight(
    tmp_path: Path,
) -> None:
    # S1: the agent's `finished` waited for its `started`'s answer (the task server answers once
    # the event is on its disk), a hop's worth of every run
    hop, went_at_once = await _second_event_while_the_first_is_on_its_way(tmp_path, 2)
    assert went_at_once
    assert hop.posts == [[_status(1).event_id], [_status(2).event_id]]
    hop, went_at_once = await _second_event_while_the_first_is_on_its_way(tmp_path, 1)
    assert not went_at_once, "one in flight: the second waits for the first's answer"
    assert hop.posts == [[_status(1).event_id], [_status(2).event_id]]


async def test_a_failed_send_holds_every_send_for_its_backoff_then_all_go_once(
    tmp_path: Path,
) -> None:
    box, hop = Outbox(tmp_path / "o.db"), _HeldHop(fail_first=True)
    backoff = Backoff(base_s=0.4, max_s=0.4, tries=None, jitter=0)
    fwd = OutboxForwarder(box, hop.send, ComponentMetrics("t"), backoff, in_flight=2)
    fwd.start()
    try:
        fwd.queue([_status(1)])
        assert await hop.next_post(5)
        hop.go.set()  # the first post fails: the gate closes for 0.4 s
        await asyncio.wait_for(hop.failed.wait(), 5)
        fwd.queue([_status(2)])
        failed_at = time.monotonic()
        assert await hop.next_post(5)
        waited = time.monotonic() - failed_at
        assert await fwd.drained(5)
    finally:
        await fwd.stop()
    assert waited >= 0.3, f"a send went {waited:.2f} s after a failure, within its backoff"
    # the failed event again, with the one queued during the backoff, each accepted once
    assert hop.posts[0] == [_status(1).event_id]
    assert sorted(e for post in hop.posts[1:] for e in post) == sorted(
        [_status(1).event_id, _status(2).event_id]
    )
    assert box.depth() == 0
    box.close()


async def test_stopping_cancels_the_sends_on_their_way_and_keeps_their_events(
    tmp_path: Path,
) -> None:
    box, hop = Outbox(tmp_path / "o.db"), _HeldHop()
    fwd = OutboxForwarder(box, hop.send, ComponentMetrics("t"), in_flight=2)
    fwd.start()
    fwd.queue([_status(1)])
    assert await hop.next_post(5)
    fwd.queue([_status(2)])
    assert await hop.next_post(5)
    await fwd.stop()  # both posts are held: neither answered
    assert box.depth() == 2, "events whose post never came back are kept"
    box.close()


def test_a_forwarder_needs_at_least_one_send_in_flight(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    with pytest.raises(ValueError, match="in_flight must be at least 1, not 0"):
        OutboxForwarder(box, _refuse, ComponentMetrics("t"), in_flight=0)
    box.close()


def test_new_event_ids_are_version_7_uuids_in_the_order_they_were_made() -> None:
    ids = [new_event_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for eid in ids[:50]:
        parsed = uuid.UUID(eid)
        assert (str(parsed), parsed.version, parsed.variant) == (eid, 7, uuid.RFC_4122)
    made_ms = int(ids[0].replace("-", "")[:12], 16)
    assert abs(made_ms / 1000 - time.time()) < 60
    # later ids sort after earlier ones (within a millisecond: in any order)
    by_ms = [eid[:13] for eid in ids]
    assert by_ms == sorted(by_ms)
    assert sorted(ids)[-1][:13] == ids[-1][:13]


def test_an_outbox_of_the_earlier_layout_keeps_its_waiting_events_and_forwarded_ids(
    tmp_path: Path,
) -> None:
    db = sqlite3.connect(tmp_path / "o.db", isolation_level=None)
    for statement in (  # the layout before forwarded ids were kept in the outbox's rows
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
        " event_id TEXT NOT NULL UNIQUE, body TEXT NOT NULL, queued_at REAL NOT NULL)",
        "CREATE TABLE forwarded (event_id TEXT PRIMARY KEY, at REAL NOT NULL)",
        "CREATE INDEX forwarded_at ON forwarded (at)",
    ):
        db.execute(statement)
    now = time.time()
    db.executemany("INSERT INTO outbox (event_id, body, queued_at) VALUES (?, ?, ?)",
                   [("e1", '{"a":1}', now), ("e2", '{"a":2}', now)])  # fmt: skip
    db.executemany("INSERT INTO forwarded (event_id, at) VALUES (?, ?)",
                   [("f1", now), ("f0", now - FORWARDED_KEEP_S - 1)])  # fmt: skip
    db.close()

    box = Outbox(tmp_path / "o.db")
    assert box.peek() == [("e1", '{"a":1}'), ("e2", '{"a":2}')]
    assert box.depth() == 2
    assert not box.put("f1", "{}"), "an id forwarded before the upgrade is remembered"
    assert box.put("f0", "{}"), "one forwarded over FORWARDED_KEEP_S ago is not"
    box.remove(["e1", "e2"])
    assert [eid for eid, _ in box.peek()] == ["f0"]
    box.close()


def test_forwarded_ids_are_remembered_for_a_while_without_their_bodies(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db")
    box.put_many([(f"e{n}", '{"big": "' + "x" * 1000 + '"}') for n in range(5)])
    box.remove(["e0", "e1", "e2"])
    assert [eid for eid, _ in box.peek()] == ["e3", "e4"]
    assert (box.depth(), box.put("e1", "{}")) == (2, False)
    kept = box._db.execute("SELECT sum(length(body)) FROM outbox").fetchone()[0]
    assert kept < 2 * 1100, "forwarded events' bodies are kept"
    box._prune(time.time() + FORWARDED_KEEP_S + 1)
    assert box.put("e1", "{}"), "a forwarded id is forgotten after FORWARDED_KEEP_S"
    box.close()
