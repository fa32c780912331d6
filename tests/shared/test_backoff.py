"""The backoff schedule: full jitter spreads each retry over its whole window; Retry-After first."""

from __future__ import annotations

from tickle.backoff import Backoff

FULL = Backoff(base_s=1.0, max_s=8.0, tries=None, full_jitter=True)
DRAWS = 2_000


def test_full_jitter_draws_each_delay_over_the_whole_window_of_its_attempt() -> None:
    for attempt, cap in ((0, 1.0), (2, 4.0), (10, 8.0)):
        delays = [FULL.delay(attempt) for _ in range(DRAWS)]
        assert all(0.0 <= d <= cap for d in delays)
        # both ends of the window are used: clients that failed together do not retry together
        assert min(delays) < cap * 0.1
        assert max(delays) > cap * 0.9


def test_the_default_jitter_keeps_each_delay_near_its_nominal_value() -> None:
    near = Backoff(base_s=1.0, max_s=8.0, jitter=0.1)
    assert all(0.9 <= near.delay(0) <= 1.1 for _ in range(DRAWS))


def test_wait_is_never_sooner_than_retry_after_and_spread_after_it() -> None:
    waits = [FULL.wait(0, retry_after_s=5.0) for _ in range(DRAWS)]
    assert all(5.0 <= w <= 6.0 for w in waits)
    assert max(waits) - min(waits) > 0.5
    assert all(0.0 <= FULL.wait(0) <= 1.0 for _ in range(DRAWS))  # nothing said: the delay alone


def test_flat_tries_keep_the_window_steady_before_it_grows() -> None:
    steady = Backoff(base_s=10.0, max_s=60.0, tries=None, full_jitter=True, flat_tries=3)
    assert [steady.cap(a) for a in range(6)] == [10.0, 10.0, 10.0, 20.0, 40.0, 60.0]
    assert [FULL.cap(a) for a in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]  # without: it grows
