"""Every pull from the NS says why (`via`): only a tickle-caused pull acknowledges the NS's tickle,
so a check landing in a tickle's resend window must not say `tickle`, and a tickle coalesced into a
check must."""

from __future__ import annotations

import asyncio

import pytest

from tests.taskserver.conftest import FakeNs, TaskServerHarness, wait_until
from tickle import wire
from tickle.messages import TsPullVia
from tickle.taskserver.ns_sync import Coalesced


class GatedJob:
    """A job that records why it ran and waits for the test to open a gate each run."""

    def __init__(self) -> None:
        self.vias: list[TsPullVia] = []
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def __call__(self, via: TsPullVia) -> None:
        self.vias.append(via)
        self.entered.set()
        await self.gate.wait()


@pytest.mark.parametrize(
    ("during", "after"),
    [
        (["tickle"], ["check", "tickle"]),
        (["tickle", "check"], ["check", "tickle"]),  # a later check does not hide the tickle
        (["check", "tickle", "start"], ["check", "tickle"]),
        (["check"], ["check", "check"]),
    ],
    ids=["tickle", "tickle-then-check", "mixed", "checks-only"],
)
async def test_triggers_coalesced_into_a_run_make_it_a_tickle_run_when_one_was_a_tickle(
    during: list[TsPullVia], after: list[TsPullVia]
) -> None:
    job = GatedJob()
    pulls = Coalesced("work pull", job)
    try:
        pulls.trigger("check")
        await asyncio.wait_for(job.entered.wait(), 2)
        for via in during:  # while the check pull is in flight
            pulls.trigger(via)
        job.gate.set()
        await asyncio.wait_for(_finished(pulls), 2)
        assert job.vias == after
    finally:
        job.gate.set()
        await pulls.close()


async def _finished(pulls: Coalesced) -> None:
    task = pulls._task
    assert task is not None
    await task


async def test_tickle_arriving_while_a_check_pull_is_in_flight_makes_the_next_pull_via_tickle(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    h.ns.work_gate = asyncio.Event()  # the NS holds the check pull until the tickle is in
    pulls = h.ns.count("work")
    h.running.sync.work.trigger("check")
    await wait_until(lambda: h.ns.count("work") > pulls, what="the check pull")

    h.send_tickle(h.ns.tickle())
    await wait_until(
        lambda: h.running.metrics.tickles_received.labels(kind="tasks")._value.get() == 1,
        what="the tickle received",
    )
    h.ns.work_gate.set()
    await wait_until(lambda: h.ns.count("work") == pulls + 2, what="the pull after the check")
    assert h.ns.vias("work")[-2:] == ["check", "tickle"]


async def test_ns_tickles_pull_work_and_settings_via_tickle(task_server: TaskServerHarness) -> None:
    h = task_server
    work, settings = h.ns.count("work"), h.ns.count("settings")
    h.send_tickle(h.ns.tickle(wire.Kind.TASKS))
    h.send_tickle(h.ns.tickle(wire.Kind.SETTINGS))
    await wait_until(lambda: h.ns.count("work") > work, what="the tickled work pull")
    await wait_until(lambda: h.ns.count("settings") > settings, what="the tickled settings pull")
    assert h.ns.vias("work")[work:] == ["tickle"]
    assert h.ns.vias("settings")[settings:] == ["tickle"]


async def test_start_pulls_via_start_and_the_periodic_check_pulls_via_check(
    fake_ns: FakeNs, harness: TaskServerHarness
) -> None:
    fake_ns.settings = fake_ns.settings.model_copy(update={"ts_check_interval_s": 1})
    await harness.start()
    await wait_until(lambda: fake_ns.count("work") >= 2, within_s=5, what="a periodic check")
    assert fake_ns.vias("work")[:2] == ["start", "check"]
    assert fake_ns.vias("settings")[0] == "start"
    await wait_until(lambda: fake_ns.count("settings") >= 2, within_s=5, what="its settings pull")
    assert fake_ns.vias("settings")[1] == "check"
    assert "tickle" not in [via for _, via in fake_ns.pulls]


async def test_work_pull_after_an_agent_registers_is_not_a_tickle_pull(
    task_server: TaskServerHarness,
) -> None:
    h = task_server
    pulls = h.ns.count("work")
    await h.register_agent("pc1")
    assert h.ns.count("work") > pulls  # it answered after the pull
    assert h.ns.vias("work")[pulls:] == ["check"]
