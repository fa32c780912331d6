"""Clocks: the time a component reads, and how far a peer's clock is off ours.

Every HTTP request between the components carries the sender's time in `X-Tickle-Time` (seconds
since the epoch, sub-second precision, unlike `Date`), and every answer the server's. The receiver
of a request takes `peer time - arrival time` as one sample of the peer's offset (positive: the
peer's clock is ahead); the sender of a request, `the server's time - the midpoint of the round
trip`. `OffsetEstimator` keeps each peer's last samples: the median of round-trip samples, so
one slow answer does not swing the estimate; the largest of one-way samples, the least delayed
(a request's delay only ever lowers its sample).

A peer whose offset is larger than the tickle freshness window rejects every tickle as stale: it
is shown as `clock_skewed`, not as unreachable, so the operator sees the real cause. The receiver
itself knows its offset from the time on its sender's answers: `ClockWarning` says in its log that
its clock is off when it rejects a stale tickle.

Tests skew one agent's clock with `TICKLE_TEST_CLOCK_OFFSET_S` (test-only: refused unless
`TICKLE_TESTING=1` is set too): the agent reads the time through the clock `from_environment`
returns, so only that process is skewed.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from tickle import wire

TIME_HEADER = "X-Tickle-Time"
TEST_OFFSET_ENV = "TICKLE_TEST_CLOCK_OFFSET_S"
TESTING_ENV = "TICKLE_TESTING"
# the samples an estimate is the median of
SAMPLES = 9
# the one-way samples an estimate is the largest of: a clock set right is followed after as many
# requests as the median of 9 took
ONE_WAY_SAMPLES = 5
# below this an offset is measurement noise (latency, `Date`'s 1 s steps): times stay as they are
CORRECTION_MIN_S = 1.0
# a sender's time further off ours than this (about 30 years) is garbage, not a skewed clock
_SANE_OFFSET_S = 1e9
# a receiver says its clock is off at most this often (each stale tickle is counted anyway)
WARNING_INTERVAL_S = 600.0

Clock = Callable[[], float]


class ClockConfigError(ValueError):
    """The test clock offset is set where it must not be, or is not a number."""


def from_environment(environ: Mapping[str, str]) -> Clock:
    """The wall clock a component reads: `time.time`, shifted in tests only.

    `TICKLE_TEST_CLOCK_OFFSET_S` (seconds, may be negative) shifts it, and only when
    `TICKLE_TESTING=1` says this is a test: a production host never runs on a shifted clock.
    """
    raw = environ.get(TEST_OFFSET_ENV)
    if raw is None or raw == "":
        return time.time
    if environ.get(TESTING_ENV) != "1":
        raise ClockConfigError(
            f"{TEST_OFFSET_ENV} is for tests only: it is refused unless {TESTING_ENV}=1 is set"
        )
    try:
        offset = float(raw)
    except ValueError:
        message = f"{TEST_OFFSET_ENV} must be a number of seconds, got {raw!r}"
        raise ClockConfigError(message) from None
    if not math.isfinite(offset) or abs(offset) > _SANE_OFFSET_S:
        raise ClockConfigError(f"{TEST_OFFSET_ENV} must be a finite number of seconds")

    def shifted() -> float:
        return time.time() + offset

    return shifted


def header_value(at: float) -> str:
    """`at` as `X-Tickle-Time` carries it (milliseconds are plenty)."""
    return f"{at:.3f}"


def parse_header(value: str | None, now: float) -> float | None:
    """The time in an `X-Tickle-Time` header; None when absent or not a sane time.

    The header only informs: a malformed one is ignored, never a reason to refuse a request.
    """
    if value is None or len(value) > 32:
        return None
    try:
        at = float(value)
    except ValueError:
        return None
    if not math.isfinite(at) or abs(at - now) > _SANE_OFFSET_S:
        return None
    return at


def skewed(offset_s: float | None, window_s: float) -> bool:
    """Whether a peer this far off rejects (or sends) every tickle as stale."""
    return offset_s is not None and abs(offset_s) > window_s


def describe(offset_s: float | None) -> str:
    """How an offset reads in a table: `+60.0s`, `-0.3s`, `±0.0s`, or `-` when unmeasured."""
    if offset_s is None:
        return "-"
    if abs(offset_s) < 0.05:
        return "±0.0s"
    return f"{offset_s:+.1f}s"


class OffsetEstimator:
    """Per peer, an estimate of its offset from its last offset samples (a few floats a peer).

    Round-trip samples (the server's time against the midpoint of a request's round trip) err
    either way by up to half the round trip: their median. One-way samples (`one_way`: the
    peer's time against its request's arrival) are the offset less the request's delay, which is
    never negative and, under load, seconds (a request waiting in a busy server's accept queue):
    their largest, the least delayed. The median took the queue for the clock: at 10,000 agents
    (issue 10's S2) the task servers estimated their agents 2 s behind, past `CORRECTION_MIN_S`,
    and the NS moved the agents' steps of every timeline 2 s later.
    """

    def __init__(self, samples: int | None = None, one_way: bool = False) -> None:
        self._one_way = one_way
        self._samples = samples or (ONE_WAY_SAMPLES if one_way else SAMPLES)
        self._by_peer: dict[str, deque[float]] = {}

    def add(self, peer: str, sample_s: float) -> float:
        """Take one sample of `peer`'s offset; return its estimate now."""
        window = self._by_peer.get(peer)
        if window is None:
            window = self._by_peer[peer] = deque(maxlen=self._samples)
        window.append(sample_s)
        return self._estimate(window)

    def _estimate(self, window: deque[float]) -> float:
        return max(window) if self._one_way else statistics.median(window)

    def offset(self, peer: str) -> float | None:
        """The estimate of `peer`'s offset (None: no sample yet)."""
        window = self._by_peer.get(peer)
        return self._estimate(window) if window else None

    def forget(self, peer: str) -> None:
        self._by_peer.pop(peer, None)

    def offsets(self) -> dict[str, float]:
        """Every peer's estimate."""
        return {peer: self._estimate(w) for peer, w in self._by_peer.items() if w}


class ClockWarning:
    """Says, at most once per `interval_s`, that our clock is off our tickle sender's.

    Called with each rejected tickle; only a stale one, while `offset()` (our clock's offset from
    the sender's, measured from its answers) is beyond the freshness window, is explained.
    """

    def __init__(
        self,
        offset: Callable[[], float | None],
        sender: Callable[[], str],
        window_s: float,
        log: logging.Logger,
        interval_s: float = WARNING_INTERVAL_S,
    ) -> None:
        self._offset = offset
        self._sender = sender
        self._window_s = window_s
        self._log = log
        self._interval_s = interval_s
        self._warned_at: float | None = None  # monotonic

    def rejected(self, exc: wire.TickleRejected) -> None:
        """A tickle was rejected: explain it when our clock is the cause."""
        offset = self._offset()
        if exc.reason is not wire.RejectReason.STALE or not skewed(offset, self._window_s):
            return
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < self._interval_s:
            return
        self._warned_at = now
        self._log.warning(
            "this computer's clock is %+.1fs off %s's (measured from its answers), beyond the "
            "%.0fs tickle freshness window: every tickle from it is rejected as stale and work "
            "arrives only by polling; set the clock right (NTP)",
            offset, self._sender(), self._window_s,
        )  # fmt: skip


def iso(at: float) -> str:
    """Unix seconds as ISO 8601 in UTC, to the millisecond: 2026-11-30T14:20:57.123Z."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_times(data: Any) -> Any:
    """JSON-ready `data` with every time (`at`, `*_at`: unix seconds) as an ISO 8601 UTC string:
    what the CLI prints (the APIs keep unix seconds)."""
    if isinstance(data, dict):
        return {k: iso(v) if _is_time(k, v) else iso_times(v) for k, v in data.items()}
    if isinstance(data, list):
        return [iso_times(v) for v in data]
    return data


def _is_time(key: str, value: object) -> bool:
    return (key == "at" or key.endswith("_at")) and type(value) in (int, float)
