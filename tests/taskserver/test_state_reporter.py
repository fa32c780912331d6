"""The task server's reports of its agents' states reach a busy NS: after its Retry-After, spread."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from tickle.backoff import Backoff
from tickle.http import ApiError
from tickle.messages import ComputerState, TaskServerCredentials
from tickle.taskserver import state_reporter
from tickle.taskserver.ns_client import NsClient
from tickle.taskserver.state_reporter import StateReporter

from .conftest import FakeNs, wait_until


async def test_a_state_report_a_busy_ns_refused_is_sent_again_after_its_retry_after(
    fake_ns: FakeNs,
) -> None:
    # 429 is "not now", not "never": the report was dropped as refused for good before
    fake_ns.states_busy = 1
    fake_ns.refusal_retry_after_s = 1
    ns = _ns_client(fake_ns)
    reporter = StateReporter(ns, Backoff(base_s=0.05, max_s=0.1, tries=3, full_jitter=True))
    reporter.start()
    try:
        sent_at = time.monotonic()
        reporter.report(ComputerState(name="pc1", tickle_state="unreachable", at=time.time()))
        await wait_until(lambda: fake_ns.states, within_s=10, what="the report delivered")
        assert fake_ns.count("states") == 2
        assert time.monotonic() - sent_at >= 1.0  # not before the NS's Retry-After
        assert [s.name for s in fake_ns.states] == ["pc1"]
    finally:
        await reporter.close()
        await ns.close()


@contextlib.asynccontextmanager
async def _refused_report(fake_ns: FakeNs, backoff: Backoff) -> AsyncIterator[None]:
    """A report the NS refuses once (as `fake_ns` is set to), then an answer of the NS to
    another request (it is back); the reporter stops when the block ends."""
    ns = _ns_client(fake_ns)
    reporter = StateReporter(ns, backoff)
    reporter.start()
    try:
        reporter.report(ComputerState(name="pc1", tickle_state="unreachable", at=time.time()))
        await wait_until(lambda: fake_ns.count("states") == 1, within_s=10, what="the refusal")
        await ns.clients()  # answered: the NS is back
        yield
    finally:
        await reporter.close()
        await ns.close()


async def test_a_state_report_that_found_the_ns_away_goes_as_soon_as_it_answers_another_request(
    fake_ns: FakeNs,
) -> None:
    # an NS restart: each of a task server's senders waited out its own jittered retry, the last
    # 5-7 s after the NS answered its first request (S6 of issue 10)
    fake_ns.states_busy = 1  # 429 without Retry-After: our own backoff says when (60 s here)
    async with _refused_report(fake_ns, Backoff(base_s=60.0, max_s=60.0, tries=3, jitter=0.0)):
        await wait_until(lambda: fake_ns.states, within_s=5, what="the report sent again")
    assert [s.name for s in fake_ns.states] == ["pc1"]
    assert fake_ns.count("states") == 2


async def test_a_state_report_waits_out_the_retry_after_of_a_busy_ns_whatever_else_it_answers(
    fake_ns: FakeNs,
) -> None:
    fake_ns.states_busy = 1
    fake_ns.refusal_retry_after_s = 60
    async with _refused_report(fake_ns, Backoff(base_s=0.05, max_s=0.1, tries=3, jitter=0.0)):
        await asyncio.sleep(1.0)  # nothing to wait for: the report must not come
    assert fake_ns.count("states") == 1


async def test_the_ns_client_says_once_that_the_ns_is_back_after_a_request_found_it_away(
    fake_ns: FakeNs,
) -> None:
    ns = _ns_client(fake_ns)
    back: list[float] = []
    ns.on_back(lambda: back.append(time.monotonic()))
    try:
        await ns.clients()
        assert back == []  # never away
        fake_ns.states_busy = 1
        with pytest.raises(ApiError):
            await ns.computer_states([ComputerState(name="pc1", at=time.time())])
        assert back == []
        await ns.clients()
        await ns.clients()
        assert len(back) == 1
    finally:
        await ns.close()


async def test_state_changes_arriving_while_reports_are_posted_go_together(
    fake_ns: FakeNs,
) -> None:
    # a run-now turns a fleet reachable one pull after another: each report posted as soon as
    # the previous one came back made one post per NS round trip (S5: ~260 posts of ~19 states)
    fake_ns.states_delay_s = 0.02
    ns = _ns_client(fake_ns)
    reporter = StateReporter(ns)
    reporter.start()
    try:
        started = time.monotonic()
        for n in range(50):  # one change every 10 ms for half a second
            reporter.tickle_state(f"pc{n}", "reachable")
            await asyncio.sleep(0.01)
        await wait_until(lambda: len(fake_ns.states) == 50, within_s=10, what="every report")
        spent = time.monotonic() - started
        # at most one post per COALESCE_S (and the first one at once)
        assert fake_ns.count("states") <= spent / state_reporter.COALESCE_S + 2
        assert {s.name for s in fake_ns.states} == {f"pc{n}" for n in range(50)}
    finally:
        await reporter.close()
        await ns.close()


def test_state_reports_lost_together_come_back_spread_over_the_window() -> None:
    # every task server of a restarted NS failed its reports at the same moment
    delays = {round(state_reporter.RETRY.delay(0), 3) for _ in range(50)}
    assert state_reporter.RETRY.full_jitter
    assert len(delays) > 25


def _ns_client(fake_ns: FakeNs) -> NsClient:
    """A client of `fake_ns` with its task server's valid credentials."""
    ns = NsClient(fake_ns.url)
    creds = TaskServerCredentials(name="ts1", token=fake_ns.ts_token, tickle_key="", ns_id="ns")
    ns.use_credentials(creds, reregister=_never)
    return ns


async def _never() -> TaskServerCredentials:
    raise AssertionError("the token is valid: no registration")


async def test_reports_of_one_computer_queued_together_merge_each_field_keeping_its_latest(
    fake_ns: FakeNs,
) -> None:
    # a pull turns an agent reachable, measures its clock and notes its address and contact:
    # queued before the next post, they reach the NS as one state holding all of them
    ns = _ns_client(fake_ns)
    reporter = StateReporter(ns)
    reporter.report(ComputerState(name="pc1", clock_offset_s=0.5, contact_at=100.0, at=1.0))
    reporter.tickle_state("pc1", "reachable")
    reporter.note("pc1", 3.0, observed_address="10.0.0.7", contact_at=50.0, settings_version=4)
    reporter.note("pc1", 4.0, clock_offset_s=-0.25)
    reporter.report(ComputerState(name="pc2", tickle_state="unreachable", at=2.0))
    reporter.start()
    try:
        await wait_until(lambda: len(fake_ns.states) == 2, within_s=10, what="both reports")
        assert fake_ns.count("states") == 1
        by_name = {s.name: s for s in fake_ns.states}
        assert by_name["pc1"] == ComputerState(
            name="pc1",
            tickle_state="reachable",
            observed_address="10.0.0.7",
            clock_offset_s=-0.25,
            at=4.0,
            contact_at=100.0,  # the latest contact, not the last one told
            settings_version=4,
        )
        assert by_name["pc2"] == ComputerState(name="pc2", tickle_state="unreachable", at=2.0)
    finally:
        await reporter.close()
        await ns.close()
