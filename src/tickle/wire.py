"""The tickle datagram: the one wire format every tickle sender and listener imports.

A tickle says only "you have something to pull" (tasks pending, or settings changed); it never
carries a task. Each datagram is authenticated with HMAC-SHA256 under the key of its link and
carries sender id, kind, sequence number and send time, so a listener can reject forgeries,
alterations, stale and replayed datagrams before anything is pulled, also after a restart (each
sender's high-water mark is kept in the listener's database).
"""

from __future__ import annotations

import enum
import hmac
import itertools
import struct
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

MAGIC = b"TKL"
VERSION = 1
MAC_LEN = 32
MAX_SENDER_LEN = 64
MAX_DATAGRAM = 512
_HEADER = struct.Struct("!3sBBB")  # magic, version, kind, sender_len
_TAIL = struct.Struct("!QQ")  # seq, sent_at_ms
MIN_DATAGRAM = _HEADER.size + 1 + _TAIL.size + MAC_LEN
# the one default of every component's freshness_window_s (config.FreshnessWindowS)
DEFAULT_FRESHNESS_S = 30.0


class Kind(enum.IntEnum):
    """What the receiver should pull."""

    TASKS = 1  # tasks pending: pull work
    SETTINGS = 2  # settings changed: pull settings


class RejectReason(enum.StrEnum):
    """Why a datagram was rejected; the label of the rejected-tickles counter."""

    MALFORMED = "malformed"
    VERSION = "version"
    UNKNOWN_KIND = "unknown_kind"
    UNKNOWN_SENDER = "unknown_sender"
    BAD_MAC = "bad_mac"
    STALE = "stale"
    REPLAYED = "replayed"


class TickleRejected(Exception):
    """A datagram that must not cause a pull."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Tickle:
    """A verified tickle."""

    kind: Kind
    sender: str
    seq: int
    sent_at_ms: int

    @property
    def sent_at(self) -> float:
        return self.sent_at_ms / 1000.0


def encode(kind: Kind, sender: str, seq: int, key: bytes, sent_at_ms: int | None = None) -> bytes:
    """Build an authenticated datagram."""
    sender_b = sender.encode()
    if not 1 <= len(sender_b) <= MAX_SENDER_LEN:
        raise ValueError(f"sender id must be 1..{MAX_SENDER_LEN} bytes, got {len(sender_b)}")
    if sent_at_ms is None:
        sent_at_ms = time.time_ns() // 1_000_000
    body = (
        _HEADER.pack(MAGIC, VERSION, int(kind), len(sender_b))
        + sender_b
        + _TAIL.pack(seq, sent_at_ms)
    )
    return body + hmac.digest(key, body, "sha256")


def decode(datagram: bytes, keys: Callable[[str], bytes | None] | Mapping[str, bytes]) -> Tickle:
    """Parse and authenticate a datagram; raise TickleRejected naming what is wrong.

    `keys` maps a sender id to the key of its link. Freshness and replay are checked by
    `TickleGuard`, which calls this first.
    """
    n = len(datagram)
    if n > MAX_DATAGRAM:
        raise TickleRejected(RejectReason.MALFORMED, f"oversized datagram ({n} bytes)")
    if n < MIN_DATAGRAM:
        raise TickleRejected(RejectReason.MALFORMED, f"truncated datagram ({n} bytes)")
    magic, version, kind_v, sender_len = _HEADER.unpack_from(datagram, 0)
    if magic != MAGIC:
        raise TickleRejected(RejectReason.MALFORMED, "bad magic")
    if version != VERSION:
        raise TickleRejected(RejectReason.VERSION, f"unsupported version {version}")
    if not 1 <= sender_len <= MAX_SENDER_LEN:
        raise TickleRejected(RejectReason.MALFORMED, f"bad sender length {sender_len}")
    expected = _HEADER.size + sender_len + _TAIL.size + MAC_LEN
    if n != expected:
        raise TickleRejected(RejectReason.MALFORMED, f"length {n} != expected {expected}")
    try:
        kind = Kind(kind_v)
    except ValueError:
        raise TickleRejected(RejectReason.UNKNOWN_KIND, f"unknown kind {kind_v}") from None
    start = _HEADER.size
    try:
        sender = datagram[start : start + sender_len].decode()
    except UnicodeDecodeError:
        raise TickleRejected(RejectReason.MALFORMED, "sender id is not UTF-8") from None
    key = keys(sender) if callable(keys) else keys.get(sender)
    if key is None:
        raise TickleRejected(RejectReason.UNKNOWN_SENDER, f"no key for sender {sender!r}")
    body, mac = datagram[:-MAC_LEN], datagram[-MAC_LEN:]
    if not hmac.compare_digest(mac, hmac.digest(key, body, "sha256")):
        raise TickleRejected(RejectReason.BAD_MAC, f"authenticator mismatch from {sender!r}")
    seq, sent_at_ms = _TAIL.unpack_from(datagram, start + sender_len)
    return Tickle(kind=kind, sender=sender, seq=seq, sent_at_ms=sent_at_ms)


class SequenceCounter:
    """Strictly increasing per-sender sequence numbers, also across restarts (clock-seeded)."""

    def __init__(self) -> None:
        self._counter = itertools.count(time.time_ns())

    def next(self) -> int:
        return next(self._counter)


@dataclass(frozen=True, slots=True)
class HighWaterMark:
    """The highest sequence number and the latest send time a listener accepted from one sender.

    A replay is a copy: it carries the sequence number and send time of a datagram accepted
    before, so it is at or below both. A tickle above either is new, even with a lower sequence
    number (another NS process took over dispatching, or a sender restarted after its clock was
    stepped back): it was sent after everything accepted so far.
    """

    seq: int
    sent_at_ms: int

    def covers(self, tickle: Tickle) -> bool:
        """Whether `tickle` may be a copy of one accepted up to this mark."""
        return tickle.seq <= self.seq and tickle.sent_at_ms <= self.sent_at_ms

    def raised_to(self, tickle: Tickle) -> HighWaterMark:
        return HighWaterMark(max(self.seq, tickle.seq), max(self.sent_at_ms, tickle.sent_at_ms))


class MarkStore(Protocol):
    """Where a listener keeps its senders' high-water marks across restarts."""

    def load(self) -> dict[str, HighWaterMark]:
        """Every sender's mark as last saved."""
        ...

    def save(self, sender: str, mark: HighWaterMark) -> None:
        """Keep `mark` before returning, so that it survives a crash of the process (see
        `localdb.HighWaterMarks` for a crash of the host); raise when it cannot."""
        ...


@dataclass
class TickleGuard:
    """Rejects stale and replayed datagrams after authenticating them.

    Remembers the sequence numbers seen per sender inside the freshness window; anything older is
    stale anyway, so memory stays bounded by the rate of valid tickles. With `marks`, what an
    earlier process accepted is rejected too: each accepted tickle raises its sender's
    high-water mark, saved before `check` returns it (so before its pull: a crash right after
    cannot let a copy in), and a tickle covered by the mark loaded at start is a replay.
    """

    keys: Callable[[str], bytes | None] | Mapping[str, bytes]
    freshness_s: float = DEFAULT_FRESHNESS_S
    clock: Callable[[], float] = time.time
    marks: MarkStore | None = None
    _seen: dict[str, tuple[set[int], deque[tuple[float, int]]]] = field(default_factory=dict)
    _marks_at_start: dict[str, HighWaterMark] = field(default_factory=dict)
    _marks_now: dict[str, HighWaterMark] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.marks is not None:
            self._marks_at_start = self.marks.load()
            self._marks_now = dict(self._marks_at_start)

    def check(self, datagram: bytes) -> Tickle:
        """Return the verified, fresh, first-seen tickle, or raise TickleRejected.

        Raises whatever `marks.save` raises when the mark cannot be kept: the tickle is then not
        accepted (its sender resends).
        """
        tickle = decode(datagram, self.keys)
        now = self.clock()
        age = now - tickle.sent_at
        if abs(age) > self.freshness_s:
            raise TickleRejected(
                RejectReason.STALE,
                f"sent {age:.1f}s from now, outside the {self.freshness_s:.0f}s window",
            )
        earlier = self._marks_at_start.get(tickle.sender)
        if earlier is not None and earlier.covers(tickle):
            raise TickleRejected(
                RejectReason.REPLAYED,
                f"seq {tickle.seq} from {tickle.sender!r} was possibly accepted before a restart",
            )
        seen, order = self._seen.setdefault(tickle.sender, (set(), deque()))
        while order and now - order[0][0] > 2 * self.freshness_s:
            seen.discard(order.popleft()[1])
        if tickle.seq in seen:
            raise TickleRejected(RejectReason.REPLAYED, f"seq {tickle.seq} from {tickle.sender!r}")
        self._raise_mark(tickle)
        seen.add(tickle.seq)
        order.append((now, tickle.seq))
        return tickle

    def _raise_mark(self, tickle: Tickle) -> None:
        if self.marks is None:
            return
        mark = self._marks_now.get(tickle.sender)
        raised = (
            HighWaterMark(tickle.seq, tickle.sent_at_ms) if mark is None else mark.raised_to(tickle)
        )
        if raised != mark:  # a reordered datagram below the mark writes nothing
            self.marks.save(tickle.sender, raised)
            self._marks_now[tickle.sender] = raised
