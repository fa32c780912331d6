"""Liveness and the settings' reach on real processes: every contact of an agent (a CEM agent's
poll too) reaches the NS through its task server's batched contact reports; a silent computer
turns offline after its bound; the gauge counts computers per state; each computer shows the
settings version its agent has."""

from __future__ import annotations

import json
import re
import time

import pytest

from tests.reliability import record
from tickle.agent.control import control_call
from tickle.messages import ComputerOut, SettingsUpdate
from tickle.testing.localfleet import AgentSpec, LocalFleet

from .conftest import Factory, agent_ctl, eventually, metric, tickle_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]
# offline after 1 x the 10 s interval + 5 s; contacts reported every half second
BOUND = ["--offline-intervals", "1", "--offline-slack-s", "5"]
FAST_CONTACTS = ["--contact-report-interval-s", "0.5"]


async def _computers(fleet: LocalFleet) -> dict[str, ComputerOut]:
    async with fleet.client() as ns:
        return {c.name: c for c in await ns.computers()}


async def test_a_cem_agents_poll_is_a_contact_and_a_silent_computer_turns_offline(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(
        ["ts1"], [AgentSpec("cem1", ["ts1"], cem=True), AgentSpec("a1", ["ts1"])],
        ns_extra=BOUND, ts_extra=FAST_CONTACTS,
    )  # fmt: skip
    async with fleet.client() as ns:
        await ns.update_settings(SettingsUpdate(task_request_interval_s=10, poll_jitter_fraction=0))
    for name in ("cem1", "a1"):  # a contact: takes the 10 s interval
        assert agent_ctl(fleet, name, "policy-refresh").returncode == 0
    refreshed = (await _computers(fleet))["cem1"].last_contact_at or 0.0
    sock = fleet.root / "cem1" / "agent.sock"
    first_poll = (await control_call(sock, "GET", "/status"))["last_poll_at"]

    async def polled_and_seen() -> float | None:
        status = await control_call(sock, "GET", "/status")
        polled = status["last_poll_at"]
        if polled is None or polled == first_poll:
            return None
        contact = (await _computers(fleet))["cem1"].last_contact_at or 0.0
        return polled if contact >= polled else None

    # no tickle ever reaches a CEM agent: only its poll can move its last contact forward
    polled_at = await eventually(polled_and_seen, 30, "cem1's poll to reach the NS as a contact")
    assert polled_at > refreshed
    computers = await _computers(fleet)
    assert {c.liveness for c in computers.values()} == {"online"}
    assert await metric(fleet.ns_url, "tickle_computers", state="online") == 2
    assert await metric(fleet.ns_url, "tickle_computers", state="offline") == 0

    fleet.kill("cem1")
    killed_contact = (await _computers(fleet))["cem1"].last_contact_at or 0.0

    async def offline() -> bool:
        return (await _computers(fleet))["cem1"].liveness == "offline"

    await eventually(offline, 40, "cem1 to turn offline after 1 x 10 s + 5 s", every_s=0.5)
    silent_s = time.time() - killed_contact
    computers = await _computers(fleet)
    # offline only once the bound passed since its last contact
    assert computers["cem1"].last_contact_at == killed_contact
    assert computers["a1"].liveness == "online", "a1 polls every 10 s: within its bound"
    async with fleet.client() as ns:
        assert [c.name for c in await ns.computers("offline")] == ["cem1"]
        assert [c.name for c in await ns.computers("online")] == ["a1"]
    assert await metric(fleet.ns_url, "tickle_computers", state="offline") == 1
    assert await metric(fleet.ns_url, "tickle_computers", state="online") == 1
    listed = tickle_cli(fleet, "computers", "--offline", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [c["name"] for c in json.loads(listed.stdout)] == ["cem1"]
    record(
        case="Dead agent shown offline",
        done="CEM agent SIGKILLed (interval 10 s, offline bound 1 x 10 s + 5 s); a live one beside",
        outcome=f"offline {silent_s:.1f} s after its last contact (bound 15 s), the live one"
        " online; tickle_computers gauge offline 1, online 1",
        command="pytest tests/integration/test_liveness.py",
    )


async def test_each_computer_shows_its_settings_version_and_settings_set_tells_the_reach(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(
        ["ts1"], [AgentSpec("cem1", ["ts1"], cem=True), AgentSpec("a1", ["ts1"])],
        ts_extra=FAST_CONTACTS,
    )  # fmt: skip

    async def versions(wanted: dict[str, int]) -> bool:
        got = {n: c.settings_version for n, c in (await _computers(fleet)).items()}
        return got == wanted

    await eventually(lambda: versions({"cem1": 1, "a1": 1}), 10, "both agents at version 1")
    changed = tickle_cli(fleet, "settings", "set", "--task-request-interval", "900", "--json")
    assert changed.returncode == 0, changed.stderr
    assert json.loads(changed.stdout)["version"] == 2
    # the command asks at once: a1's settings tickle may or may not have come back yet
    reach = re.search(r"settings version 2: (\d) agent\(s\) have it, (\d) take it at their next"
                      r" contact", changed.stderr)  # fmt: skip
    assert reach is not None, changed.stderr
    assert int(reach[1]) + int(reach[2]) == 2
    assert int(reach[2]) >= 1, "the CEM agent cannot have it before its next contact"
    # a1 takes it at once (a settings tickle); the CEM agent only at its next contact
    await eventually(lambda: versions({"cem1": 1, "a1": 2}), 15, "a1 at version 2, cem1 at 1")
    async with fleet.client() as ns:
        reach = await ns.settings_reach()
        assert (reach.version, reach.current, reach.pending) == (2, 1, 1)
    assert agent_ctl(fleet, "cem1", "check-now").returncode == 0
    await eventually(lambda: versions({"cem1": 2, "a1": 2}), 10, "cem1 at version 2")
    same = tickle_cli(fleet, "settings", "set", "--task-request-interval", "900", "--json")
    assert json.loads(same.stdout)["version"] == 2, "no change: no new version"
    assert "settings version 2: 2 agent(s) have it, 0 take it" in same.stderr
    table = tickle_cli(fleet, "computers")
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("v2") == 2
