"""Properties of `wire.decode` / `TickleGuard` with many examples (tests/shared/test_wire.py runs
the default 100): nothing but a datagram signed with the link's key, fresh and first seen, passes,
and nothing makes the decoder raise anything but TickleRejected."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability import record
from tickle import wire
from tickle.wire import Kind, RejectReason, TickleGuard, TickleRejected

KEY = b"\x01" * 32
SENDER = "ns"
NOW = 1_700_000_000.0
pytestmark = pytest.mark.attacks
MANY = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_tried: dict[str, int] = {}


def guard() -> TickleGuard:
    return TickleGuard({SENDER: KEY}, freshness_s=30, clock=lambda: NOW)


def valid(seq: int = 1, kind: Kind = Kind.TASKS, at: float = NOW) -> bytes:
    return wire.encode(kind, SENDER, seq, KEY, sent_at_ms=int(at * 1000))


def _count(name: str) -> None:
    _tried[name] = _tried.get(name, 0) + 1


@MANY
@given(st.binary(max_size=1024))
def test_arbitrary_bytes_are_rejected_with_a_reason(data: bytes) -> None:
    _count("arbitrary bytes")
    with pytest.raises(TickleRejected) as info:
        guard().check(data)
    assert info.value.reason in set(RejectReason)


@MANY
@given(
    version=st.integers(0, 255),
    kind=st.integers(0, 255),
    sender=st.sampled_from([SENDER, "ts1", "mallory"]) | st.text(min_size=1, max_size=64),
    seq=st.integers(0, 2**64 - 1),
    sent_at_ms=st.integers(0, 2**64 - 1),
    mac=st.binary(min_size=32, max_size=32),
)
def test_well_formed_header_with_random_fields_never_passes_without_the_key(
    version: int, kind: int, sender: str, seq: int, sent_at_ms: int, mac: bytes
) -> None:
    _count("random header fields")
    sender_b = sender.encode()[:64] or b"x"
    datagram = (
        struct.pack("!3sBBB", b"TKL", version, kind, len(sender_b))
        + sender_b
        + struct.pack("!QQ", seq, sent_at_ms)
        + mac
    )
    with pytest.raises(TickleRejected):
        guard().check(datagram)


@MANY
@given(st.data())
def test_any_damage_to_a_valid_datagram_is_rejected(data: st.DataObject) -> None:
    _count("damaged valid datagram")
    original = valid(seq=data.draw(st.integers(0, 2**64 - 1)))
    how = data.draw(st.sampled_from(["flip", "truncate", "extend", "splice"]))
    if how == "flip":
        damaged = bytearray(original)
        for index in data.draw(st.lists(st.integers(0, len(original) - 1), min_size=1, max_size=8)):
            damaged[index] ^= data.draw(st.integers(1, 255))
        datagram = bytes(damaged)
    elif how == "truncate":
        datagram = original[: data.draw(st.integers(0, len(original) - 1))]
    elif how == "extend":
        datagram = original + data.draw(st.binary(min_size=1, max_size=600))
    else:  # a valid body with another datagram's MAC
        datagram = original[: -wire.MAC_LEN] + valid(seq=0)[-wire.MAC_LEN :]
    if datagram == original:
        return  # flips that cancelled out
    with pytest.raises(TickleRejected):
        guard().check(datagram)


@MANY
@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=50), st.data())
def test_each_sequence_number_passes_once_and_only_inside_the_window(
    seqs: list[int], data: st.DataObject
) -> None:
    _count("sequence/window")
    g = guard()
    accepted = set()
    for seq in seqs:
        skew = data.draw(st.floats(-60, 60, allow_nan=False))
        datagram = valid(seq=seq, at=NOW + skew)
        stale = abs(NOW - int((NOW + skew) * 1000) / 1000) > 30
        if stale or seq in accepted:
            with pytest.raises(TickleRejected) as info:
                g.check(datagram)
            assert info.value.reason is (RejectReason.STALE if stale else RejectReason.REPLAYED)
        else:
            assert g.check(datagram).seq == seq
            accepted.add(seq)


@pytest.fixture(scope="module", autouse=True)
def _record_figures() -> Iterator[None]:
    yield
    record(
        case="wire.decode / TickleGuard properties",
        done="hypothesis: arbitrary bytes, well-formed headers with random fields, damaged valid "
        "datagrams, sequence/freshness runs",
        outcome="no datagram passes without the key, fresh and first seen; only TickleRejected",
        tried=sum(_tried.values()),
        command="pytest tests/attacks/test_wire_properties.py",
        **{k.replace(" ", "_").replace("/", "_"): v for k, v in _tried.items()},
    )
