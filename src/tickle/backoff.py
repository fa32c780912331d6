"""The one retry/backoff schedule: exponential, capped, with jitter, bounded in tries.

Two kinds of jitter. The default (`jitter`, ± a fraction of the delay) keeps each delay near its
nominal value: right for one client retrying on its own (a tickle's resends). `full_jitter`
draws each delay uniformly between 0 and the attempt's cap ("full jitter"): many clients that
failed together — a server restarted under them — come back spread over the whole window instead
of in waves, and the first retry is already spread over [0, base_s].

`flat_tries`: the first tries' delays all drawn over the same window (base_s) before the
delays grow. Clients that lost their server together then retry at an even rate until it is
back: a window that doubles at each try leaves a long, thin tail of stragglers instead, and the
server sees its clients return as a peak followed by a trickle.

`wait(attempt, retry_after_s)` is the delay to sleep: never sooner than the server's Retry-After,
and spread after it by the attempt's delay, so clients told the same Retry-After do not all
return in the same instant.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between tries: base, base*factor, ... capped at max_s, each jittered.

    `tries` bounds the number of attempts (None: until the caller stops, e.g. a forwarder that
    must deliver eventually and stops on shutdown).
    """

    base_s: float = 0.5
    factor: float = 2.0
    max_s: float = 8.0
    tries: int | None = 6
    jitter: float = 0.1
    full_jitter: bool = False  # each delay uniform over [0, cap(attempt)]; `jitter` unused
    flat_tries: int = 0  # the delays after the first `flat_tries` tries do not grow

    def cap(self, attempt: int) -> float:
        """The nominal delay after the `attempt`-th failed try (0-based), before jitter."""
        grown = min(max(0, attempt - self.flat_tries + 1) if self.flat_tries else attempt, 64)
        return min(self.max_s, self.base_s * self.factor**grown)

    def delay(self, attempt: int) -> float:
        """Delay after the `attempt`-th failed try (0-based)."""
        raw = self.cap(attempt)
        if self.full_jitter:
            return random.uniform(0.0, raw)
        if self.jitter:
            raw *= 1.0 + random.uniform(-self.jitter, self.jitter)
        return max(0.0, raw)

    def wait(self, attempt: int, retry_after_s: float = 0.0) -> float:
        """Delay before the next try: the server's Retry-After (if it said one), plus the
        attempt's delay, so the clients it told the same thing return spread, not together."""
        return max(0.0, retry_after_s) + self.delay(attempt)

    def delays(self) -> Iterator[float]:
        """The delays after each try but the last (empty for one try)."""
        attempt = 0
        while self.tries is None or attempt < self.tries - 1:
            yield self.delay(attempt)
            attempt += 1

    def total_s(self) -> float:
        """Upper bound of the time from first try to giving up (ignoring jitter)."""
        if self.tries is None:
            return float("inf")
        return sum(self.cap(i) for i in range(self.tries))
