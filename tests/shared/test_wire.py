"""The tickle datagram: authenticated, fresh, first-seen, or rejected with a reason."""

from __future__ import annotations

import signal
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickle import localdb, wire
from tickle.wire import Kind, RejectReason, TickleGuard, TickleRejected

KEY = b"k" * 32
KEYS = {"ns": KEY}


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(
    seq: int = 1, kind: Kind = Kind.TASKS, sender: str = "ns", key: bytes = KEY, at: float = 1000.0
) -> bytes:
    return wire.encode(kind, sender, seq, key, sent_at_ms=int(at * 1000))


def reason_of(guard: TickleGuard, datagram: bytes) -> RejectReason:
    with pytest.raises(TickleRejected) as info:
        guard.check(datagram)
    return info.value.reason


def test_valid_tickle_round_trips_kind_sender_seq_and_time() -> None:
    guard = TickleGuard(KEYS, clock=Clock(1000.5))
    tickle = guard.check(make(seq=42, kind=Kind.SETTINGS))
    assert (tickle.kind, tickle.sender, tickle.seq, tickle.sent_at) == (
        Kind.SETTINGS,
        "ns",
        42,
        1000.0,
    )


def test_forged_tickle_with_wrong_key_is_rejected_as_bad_mac() -> None:
    assert (
        reason_of(TickleGuard(KEYS, clock=Clock(1000)), make(key=b"x" * 32)) is RejectReason.BAD_MAC
    )


def test_altered_tickle_is_rejected_as_bad_mac() -> None:
    datagram = bytearray(make())
    datagram[-MAC_OFFSET_FROM_END] ^= 0x01  # flip a bit in the sequence number
    assert reason_of(TickleGuard(KEYS, clock=Clock(1000)), bytes(datagram)) is RejectReason.BAD_MAC


MAC_OFFSET_FROM_END = wire.MAC_LEN + 9


def test_replayed_tickle_is_rejected_and_first_copy_accepted() -> None:
    guard = TickleGuard(KEYS, clock=Clock(1000))
    datagram = make(seq=7)
    guard.check(datagram)
    assert reason_of(guard, datagram) is RejectReason.REPLAYED


def test_reordered_tickles_within_the_window_are_both_accepted() -> None:
    guard = TickleGuard(KEYS, clock=Clock(1000))
    guard.check(make(seq=9))
    assert guard.check(make(seq=8)).seq == 8


MarksIn = Callable[[Path], localdb.HighWaterMarks]


@pytest.fixture
def marks_in() -> Iterator[MarksIn]:
    """The high-water marks in a SQLite file, opened as a (re)started process opens them."""
    opened: list[sqlite3.Connection] = []

    def open_marks(path: Path) -> localdb.HighWaterMarks:
        opened.append(localdb.connect(path))
        return localdb.HighWaterMarks(opened[-1])

    yield open_marks
    for db in opened:
        db.close()


def test_replay_after_a_restart_is_rejected_as_replayed(tmp_path: Path, marks_in: MarksIn) -> None:
    datagram = make(seq=7)
    TickleGuard(KEYS, clock=Clock(1000), marks=marks_in(tmp_path / "a.db")).check(datagram)
    restarted = TickleGuard(KEYS, clock=Clock(1001), marks=marks_in(tmp_path / "a.db"))
    assert reason_of(restarted, datagram) is RejectReason.REPLAYED
    assert reason_of(restarted, make(seq=6, at=999)) is RejectReason.REPLAYED  # sent before it


def test_after_a_restart_a_restarted_senders_tickles_are_accepted(
    tmp_path: Path, marks_in: MarksIn
) -> None:
    TickleGuard(KEYS, clock=Clock(1000), marks=marks_in(tmp_path / "a.db")).check(make(seq=7))
    restarted = TickleGuard(KEYS, clock=Clock(1002), marks=marks_in(tmp_path / "a.db"))
    assert restarted.check(make(seq=8, at=1001)).seq == 8  # the same sender goes on
    assert restarted.check(make(seq=900, at=1000)).seq == 900  # a restarted sender: higher seq
    # a lower sequence sent later (another NS process took over dispatching, or the sender's
    # clock was stepped back before it restarted) is no copy of anything accepted before
    assert restarted.check(make(seq=3, at=1002)).seq == 3


class Unwritable:
    """A mark store on a broken disk."""

    def load(self) -> dict[str, wire.HighWaterMark]:
        return {}

    def save(self, sender: str, mark: wire.HighWaterMark) -> None:
        raise sqlite3.OperationalError("disk I/O error")


def test_a_tickle_whose_mark_cannot_be_saved_is_not_accepted() -> None:
    guard = TickleGuard(KEYS, clock=Clock(1000), marks=Unwritable())
    with pytest.raises(sqlite3.OperationalError):
        guard.check(make(seq=7))


def test_marks_keep_the_highest_sequence_and_latest_send_time_of_each_sender(
    tmp_path: Path, marks_in: MarksIn
) -> None:
    keys = {"ns": KEY, "ts1": KEY}
    guard = TickleGuard(keys, clock=Clock(1000), marks=marks_in(tmp_path / "a.db"))
    for seq, at in [(5, 999.0), (2**64 - 1, 998.0), (6, 1001.0)]:
        guard.check(make(seq=seq, at=at))
    guard.check(make(seq=3, sender="ts1"))
    assert marks_in(tmp_path / "a.db").load() == {
        "ns": wire.HighWaterMark(seq=2**64 - 1, sent_at_ms=1_001_000),
        "ts1": wire.HighWaterMark(seq=3, sent_at_ms=1_000_000),
    }


_ACCEPT_THEN_DIE = """
import os, signal, sys
from pathlib import Path
from tickle import localdb, wire
marks = localdb.HighWaterMarks(localdb.connect(Path(sys.argv[1])))
datagram = wire.encode(wire.Kind.TASKS, "ns", 7, b"k" * 32, sent_at_ms=int(1000.0 * 1000))
wire.TickleGuard({"ns": b"k" * 32}, clock=lambda: 1000.0, marks=marks).check(datagram)
os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: as a crash
"""


def test_a_mark_saved_by_a_process_killed_right_after_survives(
    tmp_path: Path, marks_in: MarksIn
) -> None:
    # the mark's commit is not synced (a power cut is the only thing that could undo it, see
    # localdb.HighWaterMarks): a crash of the process must not lose it
    died = subprocess.run([sys.executable, "-c", _ACCEPT_THEN_DIE, str(tmp_path / "a.db")])
    assert died.returncode == -signal.SIGKILL
    restarted = TickleGuard(KEYS, clock=Clock(1001), marks=marks_in(tmp_path / "a.db"))
    assert reason_of(restarted, make(seq=7)) is RejectReason.REPLAYED


def test_saving_a_mark_leaves_the_databases_other_commits_synced(tmp_path: Path) -> None:
    db = localdb.connect(tmp_path / "a.db")
    try:
        TickleGuard(KEYS, clock=Clock(1000), marks=localdb.HighWaterMarks(db)).check(make(seq=7))
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        db.close()


@pytest.mark.parametrize("skew", [-31.0, 31.0])
def test_stale_or_future_tickle_is_rejected(skew: float) -> None:
    guard = TickleGuard(KEYS, freshness_s=30, clock=Clock(1000 + skew))
    assert reason_of(guard, make(at=1000)) is RejectReason.STALE


def test_replay_after_the_window_is_stale_not_accepted() -> None:
    clock = Clock(1000)
    guard = TickleGuard(KEYS, freshness_s=30, clock=clock)
    datagram = make()
    guard.check(datagram)
    clock.now = 1100
    assert reason_of(guard, datagram) is RejectReason.STALE


def test_unknown_sender_is_rejected() -> None:
    datagram = make(sender="mallory")
    assert reason_of(TickleGuard(KEYS, clock=Clock(1000)), datagram) is RejectReason.UNKNOWN_SENDER


def test_unknown_kind_and_wrong_version_are_rejected() -> None:
    datagram = bytearray(make())
    datagram[4] = 9
    assert (
        reason_of(TickleGuard(KEYS, clock=Clock(1000)), bytes(datagram))
        is RejectReason.UNKNOWN_KIND
    )
    datagram = bytearray(make())
    datagram[3] = 2
    assert reason_of(TickleGuard(KEYS, clock=Clock(1000)), bytes(datagram)) is RejectReason.VERSION


@pytest.mark.parametrize(
    "datagram",
    [b"", b"TKL", make()[:-1], make() + b"x", b"XXX" + make()[3:], b"\x00" * 600],
    ids=["empty", "header-only", "truncated", "trailing-byte", "bad-magic", "oversized"],
)
def test_malformed_datagrams_are_rejected_as_malformed(datagram: bytes) -> None:
    assert reason_of(TickleGuard(KEYS, clock=Clock(1000)), datagram) is RejectReason.MALFORMED


def test_sender_id_that_is_not_utf8_is_malformed() -> None:
    body = struct.pack("!3sBBB", b"TKL", 1, 1, 2) + b"\xff\xfe" + struct.pack("!QQ", 1, 1_000_000)
    assert (
        reason_of(TickleGuard(KEYS, clock=Clock(1000)), body + b"\x00" * 32)
        is RejectReason.MALFORMED
    )


def test_encode_refuses_an_empty_or_too_long_sender() -> None:
    with pytest.raises(ValueError, match="sender id"):
        wire.encode(Kind.TASKS, "", 1, KEY)
    with pytest.raises(ValueError, match="sender id"):
        wire.encode(Kind.TASKS, "s" * 65, 1, KEY)


def test_sequence_counter_is_strictly_increasing() -> None:
    counter = wire.SequenceCounter()
    values = [counter.next() for _ in range(1000)]
    assert values == sorted(set(values))


@given(st.binary(max_size=700))
def test_arbitrary_bytes_never_pass_and_never_crash(data: bytes) -> None:
    guard = TickleGuard(KEYS, clock=Clock(1000))
    with pytest.raises(TickleRejected):
        guard.check(data)


@given(
    st.integers(min_value=0, max_value=2**64 - 1),
    st.sampled_from(list(Kind)),
    st.text(min_size=1, max_size=16),
)
def test_any_valid_tickle_decodes_to_what_was_encoded(seq: int, kind: Kind, sender: str) -> None:
    key = b"z" * 32
    tickle = wire.decode(wire.encode(kind, sender, seq, key, sent_at_ms=5), {sender: key})
    assert (tickle.seq, tickle.kind, tickle.sender) == (seq, kind, sender)


@given(st.data())
def test_any_single_byte_change_is_rejected(data: st.DataObject) -> None:
    datagram = bytearray(make())
    index = data.draw(st.integers(min_value=0, max_value=len(datagram) - 1))
    datagram[index] ^= data.draw(st.integers(min_value=1, max_value=255))
    with pytest.raises(TickleRejected):
        TickleGuard(KEYS, clock=Clock(1000)).check(bytes(datagram))
