"""The history store and liveness counts on PostgreSQL: the same queries as on SQLite (filtered
counts, paging, deletions that keep history)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tickle import messages as m
from tickle.ns.credentials import token_sha256
from tickle.ns.errors import Conflict
from tickle.ns.liveness import OfflineBound
from tickle.ns.models import Computer
from tickle.ns.stores import Stores
from tickle.ns.stores.history import RunFilter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
def stores(pg_url: str) -> Iterator[Stores]:
    s = Stores.open(pg_url)
    try:
        s.database.migrate()
        yield s
    finally:
        s.close()


def test_runs_liveness_reach_and_deletions_on_postgresql(stores: Stores) -> None:
    creds = stores.inventory.register_task_server(
        m.TaskServerRegister(
            enrollment_secret="x" * 16, name="ts1", tickle_host="127.0.0.1", api_url="http://h"
        ),
        "ns",
    )
    ts = stores.inventory.caller_for(token_sha256(creds.token))
    assert ts is not None
    for name in ("c1", "c2"):
        stores.inventory.register_agent(ts, m.AgentRegistration(name=name))
    task = stores.catalog.create_task(m.TaskCreate(name="t", command=["true"]))
    runs = [
        stores.delivery.create_run(m.RunCreate(task_id=task.id, computers=["c1", "c2"])),
        stores.delivery.create_run(
            m.RunCreate(task=m.TaskSpec(name="adhoc", command=["true"]), computers=["c2"])
        ),
    ]
    page = stores.history.runs(RunFilter(), limit=1)
    assert ([r.id for r in page.runs], page.next_before) == ([runs[1].id], runs[1].id)
    assert page.runs[0].label == "adhoc"
    rest = stores.history.runs(RunFilter(computer="c1", status="pending"), limit=5)
    assert [(r.id, r.statuses) for r in rest.runs] == [(runs[0].id, {"pending": 2})]
    assert len(stores.history.computer_executions("c2", limit=5).executions) == 2

    old = time.time() - 7200  # c2 last heard of two hours ago: offline under 2 x 1800 s + 60 s
    forgotten = stores.inventory.update_computer_states(ts, [
        m.ComputerState(name="c1", at=time.time(), contact_at=time.time(), settings_version=1),
        m.ComputerState(name="c2", at=old, contact_at=old),
    ])  # fmt: skip
    assert forgotten == []
    with stores.database.writing() as s:  # registration stamped c2 just now: back-date it
        s.query(Computer).filter(Computer.name == "c2").update({"last_contact_at": old})
    bound = OfflineBound(intervals=2, slack_s=60)
    assert stores.inventory.liveness_counts(bound) == {"online": 1, "offline": 1}
    assert [c.name for c in stores.inventory.computers(bound, "offline")] == ["c2"]
    reach = stores.history.settings_reach()
    assert (reach.version, reach.current, reach.pending) == (1, 1, 1)

    with pytest.raises(Conflict, match="unfinished"):
        stores.history.delete_task(task.id)
    with pytest.raises(Conflict, match="unfinished"):
        stores.history.forget_computer("c1")
    with pytest.raises(Conflict, match="still serves 2 computer"):
        stores.history.delete_task_server("ts1")
    assert stores.history.delete_task_server("ts1", force=True) == 2
    assert {c.task_server for c in stores.inventory.computers(bound)} == {None}
