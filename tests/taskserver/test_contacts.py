"""The agents' contacts (last contact, settings version) reach the NS in batches: cheap at 10,000
agents; a computer the NS forgot loses its credentials at the task server."""

from __future__ import annotations

import asyncio
import time

from tickle.messages import ComputerState

from .conftest import FakeNs, TaskServerHarness, wait_until


def _contacts(ns: FakeNs, name: str, since: float = 0.0) -> list[ComputerState]:
    return [s for s in ns.states if s.name == name and (s.contact_at or 0.0) > since - 1e-3]


async def test_every_kind_of_contact_is_reported_with_the_agents_settings_version(
    harness: TaskServerHarness,
) -> None:
    harness.overrides["contact_report_interval_s"] = 0.2
    await harness.start()
    agent = await harness.register_agent("pc1", cem=True)
    for path, version in (
        ("/api/agent/tasks?via=poll&settings_version=0", 1),  # the answer hands it version 1
        ("/api/agent/policy?settings_version=1", 1),
    ):
        before = time.time()
        status, _ = await harness.call(agent, "GET", path)
        assert status == 200
        seen = await wait_until(
            lambda t=before: _contacts(harness.ns, "pc1", t), what=f"the contact of {path}"
        )
        assert seen[-1].settings_version == version
    before = time.time()
    status, _ = await harness.call(
        agent, "POST", "/api/agent/events?settings_version=7", json={"events": []}
    )
    assert status == 200
    seen = await wait_until(
        lambda: _contacts(harness.ns, "pc1", before), what="the contact of an event post"
    )
    assert seen[-1].settings_version == 7


async def test_ten_thousand_agents_contacts_cost_the_ns_ten_reports_not_one_per_pull(
    harness: TaskServerHarness,
) -> None:
    harness.overrides["contact_report_interval_s"] = 3600  # flushed by hand below
    ts = await harness.start()
    agent = await harness.register_agent("pc1")
    for _ in range(50):  # pulls are one dict write each: nothing reaches the NS yet
        assert (await harness.call(agent, "GET", "/api/agent/tasks?via=poll"))[0] == 200
    for i in range(10_000):
        ts.reporter.contact(f"pc{i:05d}", 1)
    calls = harness.ns.count("states")
    assert _contacts(harness.ns, "pc1", 1.0) == []
    ts.reporter.flush_contacts()
    await wait_until(
        lambda: len({s.name for s in harness.ns.states if s.contact_at}) >= 10_001, within_s=30,
        what="10,001 contacts at the NS",
    )  # fmt: skip
    assert harness.ns.count("states") - calls <= 11  # parts of at most 1,000 computers


async def test_a_computer_the_ns_forgot_loses_its_credentials_at_the_task_server(
    harness: TaskServerHarness,
) -> None:
    harness.overrides["contact_report_interval_s"] = 0.2
    await harness.start()
    agent = await harness.register_agent("pc1")
    harness.ns.forgotten.add("pc1")
    assert (await harness.call(agent, "GET", "/api/agent/tasks?via=poll"))[0] == 200
    await wait_until(lambda: harness.running.store.client("pc1") is None, what="pc1 dropped")
    status, _ = await harness.call(agent, "GET", "/api/agent/tasks?via=poll")
    assert status == 401, "its token no longer authenticates: it must register anew"


async def test_state_changes_a_run_brings_one_after_another_reach_the_ns_in_few_reports(
    harness: TaskServerHarness,
) -> None:
    # a run-now on a fleet: its agents answer their tickles one after another, each turning
    # reachable; reported one post each, every pull of the run cost the NS a write of its own
    harness.overrides["contact_report_interval_s"] = 3600
    ts = await harness.start()
    calls = harness.ns.count("states")
    for i in range(20):
        ts.reporter.tickle_state(f"pc{i:02d}", "reachable")
        await asyncio.sleep(0.005)  # the NS answers each report meanwhile
    await wait_until(
        lambda: len({s.name for s in harness.ns.states if s.tickle_state}) == 20,
        what="the 20 reachable states at the NS",
    )
    assert harness.ns.count("states") - calls <= 3
