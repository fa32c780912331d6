"""The tickle datagram: authenticated, fresh, first-seen, or rejected with a reason."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tickle import wire
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
