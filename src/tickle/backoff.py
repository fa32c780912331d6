"""The one retry/backoff schedule: exponential, capped, with jitter, bounded in tries."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between tries: base, base*factor, ... capped at max_s, each +/- jitter.

    `tries` bounds the number of attempts (None: until the caller stops, e.g. a forwarder that
    must deliver eventually and stops on shutdown).
    """

    base_s: float = 0.5
    factor: float = 2.0
    max_s: float = 8.0
    tries: int | None = 6
    jitter: float = 0.1

    def delay(self, attempt: int) -> float:
        """Delay after the `attempt`-th failed try (0-based)."""
        raw = min(self.max_s, self.base_s * self.factor ** min(attempt, 64))
        if self.jitter:
            raw *= 1.0 + random.uniform(-self.jitter, self.jitter)
        return max(0.0, raw)

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
        return sum(min(self.max_s, self.base_s * self.factor**i) for i in range(self.tries))
