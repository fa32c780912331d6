"""The inventory store's agent registration (SQLAlchemy Core): what it keeps, and whether the
computer moved from another task server (only then does the NS run a dispatch pass for it)."""

from __future__ import annotations

from tests.ns.test_delivery_store import stores, task_server  # noqa: F401  (a fixture)
from tickle import messages as m
from tickle.ns.credentials import token_sha256
from tickle.ns.stores import Stores


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
