"""The inventory store's agent registration (SQLAlchemy Core): what it keeps, whether the
computer moved from another task server (only then does the NS run a dispatch pass for it), and
registrations written together (one transaction) each answered as if it came alone."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import event

from tests.ns.test_delivery_store import stores, task_server  # noqa: F401  (a fixture)
from tickle import messages as m
from tickle.ns.credentials import token_sha256
from tickle.ns.errors import Conflict, Forbidden
from tickle.ns.stores import Stores
from tickle.ns.stores.inventory import Enrolled, Enrollment


def test_registration_says_moved_only_for_a_computer_of_another_task_server(
    stores: Stores,  # noqa: F811
) -> None:
    ts1, ts2 = task_server(stores, "ts1"), task_server(stores, "ts2")
    reg = m.AgentRegistration(name="pc1", groups=["lab"], reported_address="10.0.0.1",
                              observed_address="192.0.2.1", cem=True)  # fmt: skip
    assert not stores.inventory.enroll_agent(ts1, reg).moved  # new
    assert not stores.inventory.enroll_agent(ts1, reg).moved  # again, same task server
    moved = stores.inventory.enroll_agent(ts2, reg)
    assert moved.moved
    (pc1,) = stores.inventory.computers()
    assert (pc1.task_server, pc1.groups, pc1.tickle_state) == ("ts2", ["lab"], "cem")
    caller = stores.inventory.caller_for(token_sha256(moved.credentials.token))
    assert caller is not None
    assert (caller.role, caller.name) == ("computer", "pc1")


def test_registrations_written_together_are_one_commit_each_judged_as_if_alone(
    stores: Stores,  # noqa: F811
) -> None:
    ts1, ts2 = task_server(stores, "ts1"), task_server(stores, "ts2")
    stores.inventory.enroll_agent(ts1, m.AgentRegistration(name="old", identity="i-old" * 4))
    commits: list[object] = []
    event.listen(stores.database.engine, "commit", commits.append)
    asks = [
        Enrollment(ts1, m.AgentRegistration(name="pc1", identity="i-one" * 4)),
        # the same agent again in the same group: the second sees the first, rotates its token
        Enrollment(ts1, m.AgentRegistration(name="pc1", identity="i-one" * 4)),
        # another agent under that name: refused, the first keeps it
        Enrollment(ts1, m.AgentRegistration(name="pc1", identity="i-two" * 4)),
        Enrollment(ts2, m.AgentRegistration(name="old", identity="i-old" * 4)),  # moves to ts2
        # a new name under manual approval waits for an operator; its request is kept
        Enrollment(ts1, m.AgentRegistration(name="new", identity="i-new" * 4), manual=True),
    ]
    first, second, other, old, new = stores.inventory.enroll_agents(asks)
    assert len(commits) == 1
    assert isinstance(first, Enrolled)
    assert isinstance(second, Enrolled)
    assert first.credentials.token != second.credentials.token
    assert (first.moved, second.moved) == (False, False)
    assert isinstance(other, Conflict)
    assert "pc1 is registered to another agent" in str(other)
    assert isinstance(old, Enrolled)
    assert old.moved
    assert isinstance(new, Forbidden)
    assert "new awaits an operator's approval" in str(new)
    pc1 = stores.inventory.caller_for(token_sha256(second.credentials.token))
    assert pc1 is not None
    assert pc1.name == "pc1"
    assert stores.inventory.caller_for(token_sha256(first.credentials.token)) is None
    assert [(c.name, c.task_server) for c in stores.inventory.computers()] == [
        ("old", "ts2"), ("pc1", "ts1")
    ]  # fmt: skip
    assert [(r.name, r.state) for r in stores.registrations.registrations()] == [("new", "pending")]


def check_computer_states_apply_each_column_and_name_the_unknown(stores: Stores) -> None:  # noqa: F811
    """A task server's batch of states: each column it carries applied to its own clients (the
    latest contact kept), the names the NS does not know returned, another task server's client
    left alone and refused after the others are applied."""
    ts1, ts2 = task_server(stores, "ts1"), task_server(stores, "ts2")
    for name in ("pc1", "pc2", "pc3"):
        stores.inventory.register_agent(ts1, m.AgentRegistration(name=name, reported_address="10.0.0.1"))  # fmt: skip
    stores.inventory.register_agent(ts2, m.AgentRegistration(name="other"))
    later = time.time() + 100  # than the registrations' contacts
    states = [
        m.ComputerState(name="pc1", at=2.0, contact_at=later, settings_version=3),
        m.ComputerState(name="pc1", at=1.0, contact_at=later - 50),  # older: the latest stays
        m.ComputerState(name="pc2", at=1.0, tickle_state="unreachable", clock_offset_s=-1.5),
        m.ComputerState(name="pc3", at=1.0, observed_address="192.0.2.7"),
        m.ComputerState(name="gone", at=1.0, contact_at=1000.0),
    ]
    assert stores.inventory.update_computer_states(ts1, states) == ["gone"]
    with pytest.raises(Forbidden, match="other"):
        stores.inventory.update_computer_states(ts1, [
            m.ComputerState(name="other", at=1.0, tickle_state="unreachable"),
            m.ComputerState(name="pc1", at=3.0, tickle_state="reachable"),
        ])  # fmt: skip
    got = {c.name: c for c in stores.inventory.computers()}
    pc1, pc2, pc3, other = got["pc1"], got["pc2"], got["pc3"], got["other"]
    assert (pc1.last_contact_at, pc1.settings_version, pc1.tickle_state) == (later, 3, "reachable")
    assert (pc2.tickle_state, pc2.clock_offset_s) == ("unreachable", -1.5)
    assert (pc3.observed_address, pc3.nat_detected) == ("192.0.2.7", True)
    assert other.tickle_state != "unreachable"


def test_computer_states_apply_each_column_and_name_the_unknown(
    stores: Stores,  # noqa: F811
) -> None:
    check_computer_states_apply_each_column_and_name_the_unknown(stores)
