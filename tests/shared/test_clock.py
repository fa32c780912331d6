"""The clock helpers: the test-only shifted clock, the time header, the offset estimate."""

from __future__ import annotations

import time

import pytest

from tickle import clock


def test_the_test_clock_offset_is_refused_without_the_testing_flag() -> None:
    with pytest.raises(clock.ClockConfigError, match="TICKLE_TESTING=1"):
        clock.from_environment({clock.TEST_OFFSET_ENV: "60"})


def test_the_test_clock_offset_shifts_the_clock_in_tests() -> None:
    shifted = clock.from_environment({clock.TEST_OFFSET_ENV: "60", clock.TESTING_ENV: "1"})
    assert shifted() - time.time() == pytest.approx(60, abs=1)
    assert clock.from_environment({}) is time.time


@pytest.mark.parametrize("raw", ["soon", "nan", "inf", "1e12"])
def test_a_test_clock_offset_that_is_no_sane_number_is_named(raw: str) -> None:
    with pytest.raises(clock.ClockConfigError, match=clock.TEST_OFFSET_ENV):
        clock.from_environment({clock.TEST_OFFSET_ENV: raw, clock.TESTING_ENV: "1"})


@pytest.mark.parametrize("value", [None, "", "noon", "nan", "inf", "-1", "9" * 40])
def test_a_malformed_time_header_is_ignored(value: str | None) -> None:
    assert clock.parse_header(value, time.time()) is None


def test_one_delayed_request_does_not_swing_the_estimate() -> None:
    estimates = clock.OffsetEstimator(samples=5)
    for sample in (60.01, 59.99, 60.0, 60.02):
        estimates.add("pc1", sample)
    assert estimates.add("pc1", 30.0) == pytest.approx(60.0, abs=0.05)  # held up 30 s
    assert estimates.offset("pc2") is None
    assert clock.describe(estimates.offset("pc1")) == "+60.0s"
    assert clock.describe(0.01) == "±0.0s"
    assert clock.describe(None) == "-"


def test_one_way_samples_estimate_the_offset_from_the_least_delayed() -> None:
    # a one-way sample is the offset less the request's delay (never negative): the largest
    estimates = clock.OffsetEstimator(one_way=True)
    for delay in (3.1, 2.8, 0.02, 4.0, 3.3):  # seconds in a busy server's queue
        estimate = estimates.add("pc1", 60.0 - delay)
    assert estimate == pytest.approx(60.0, abs=0.05)
    assert clock.OffsetEstimator().offsets() == {}
    median = clock.OffsetEstimator()
    for delay in (3.1, 2.8, 0.02, 4.0, 3.3):
        median.add("pc1", 60.0 - delay)
    assert median.offset("pc1") == pytest.approx(56.9), "round-trip samples: the median"


def test_a_one_way_estimate_follows_a_clock_set_right_within_a_few_requests() -> None:
    estimates = clock.OffsetEstimator(one_way=True)
    estimates.add("pc1", 60.0)
    for _ in range(clock.ONE_WAY_SAMPLES - 1):
        assert estimates.add("pc1", 0.0) == 60.0  # (the larger sample may be the timely one)
    assert estimates.add("pc1", 0.0) == 0.0
    assert estimates.offsets() == {"pc1": 0.0}


def test_skewed_means_beyond_the_freshness_window() -> None:
    assert clock.skewed(60.0, 30.0)
    assert clock.skewed(-31.0, 30.0)
    assert not clock.skewed(29.0, 30.0)
    assert not clock.skewed(None, 30.0)
