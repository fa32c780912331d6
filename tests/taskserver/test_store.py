"""The task server's store answers agent requests from memory: what it answers must be what its
database holds, so a restart (which loads the memory from the database) answers the same."""

from __future__ import annotations

from pathlib import Path

from tests.taskserver.conftest import work_for
from tickle.messages import ClientInfo, SettingsOut
from tickle.taskserver.store import Client, Store


def _client(name: str, token: str) -> Client:
    return Client(name=name, token_sha256=token, tickle_key="a2V5", tickle_host="127.0.0.1",
                  tickle_port=50124, cem=False)  # fmt: skip


def _info(name: str, token: str) -> ClientInfo:
    """The NS's record of an agent of this task server."""
    return ClientInfo(name=name, token_sha256=token, tickle_key="a2V5", tickle_host="127.0.0.1",
                      tickle_port=50124, cem=False)  # fmt: skip


def _answers(store: Store) -> dict[str, object]:
    """Everything the store answers an agent's requests from."""
    return {
        "pending": [
            (w.execution_id, w.computer, w.agent_tickled, w.agent_pulled, w.done, w.work)
            for w in store.pending_work()
        ],
        "pending_pc1": [w.execution_id for w in store.pending_work("pc1")],
        "cancels": {c: store.cancels_for(c) for c in ("pc1", "pc2", "pc3")},
        "owners": {eid: store.work_owner(eid) for eid in range(1, 8)},
        "clients": store.clients(),
        "by_token": {t: store.client_by_token(t) for t in ("t1", "t2", "t2b", "t3")},
        "settings": store.settings(),
    }


def test_a_reopened_store_answers_what_the_running_one_answered(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.save_client(_client("pc1", "t1"))
    # registered together (one transaction), pc2 registered anew in the same group: the old
    # token is gone
    store.save_clients([_client("pc2", "t2"), _client("pc2", "t2b"), _client("pc3", "t3")])
    store.set_observed_address("pc1", "192.0.2.7")
    store.remove_clients(["pc3"])
    store.save_settings(SettingsOut(version=3, task_request_interval_s=60,
                                    poll_jitter_fraction=0.1, ts_check_interval_s=30))  # fmt: skip
    works = [work_for(1, "pc1"), work_for(2, "pc1"), work_for(3, "pc2"), work_for(4, "pc2"),
             work_for(5, "pc1")]  # fmt: skip
    assert store.reconcile(works) == [1, 2, 3, 4, 5]
    store.mark_all({"agent_tickled": [1, 2, 3], "agent_pulled": [1, 3], "done": [3]})
    assert store.add_cancels([2, 4, 5]) == [2, 4, 5]
    store.mark("done", [5])  # finished after its cancel: no cancel for it any more
    # the NS stops listing 1, lists 6 and 7
    assert store.reconcile([*works[1:], work_for(6, "pc2"), work_for(7, "pc1")]) == [6, 7]
    # and lists 1 again (an execution listed anew keeps its flags)
    assert store.reconcile([work_for(1, "pc1"), *works[1:], work_for(6, "pc2")]) == []

    running = _answers(store)
    assert running["pending_pc1"] == [1, 2]
    assert running["cancels"] == {"pc1": [2], "pc2": [4], "pc3": []}
    assert running["by_token"] == {"t1": store.client("pc1"), "t2": None,
                                   "t2b": store.client("pc2"), "t3": None}  # fmt: skip
    assert store.client("pc1") is not None
    assert store.client("pc1").observed_address == "192.0.2.7"  # type: ignore[union-attr]
    assert running["owners"][7] == "pc1"  # no longer listed: still its computer's
    store.close()

    reopened = Store(tmp_path)
    assert _answers(reopened) == running
    reopened.close()


def test_the_clients_from_the_ns_replace_the_held_ones(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.save_client(_client("pc1", "t1"))
    store.save_client(_client("pc2", "t2"))
    store.set_observed_address("pc2", "192.0.2.9")
    store.replace_clients([
        ClientInfo(name="pc2", token_sha256="t2new", tickle_key="a2V5", tickle_host=None,
                   tickle_port=50124, cem=True),
    ])  # fmt: skip
    assert [c.name for c in store.clients()] == ["pc2"]
    assert store.client_by_token("t1") is None
    assert store.client_by_token("t2") is None
    pc2 = store.client_by_token("t2new")
    assert pc2 is not None
    assert (pc2.cem, pc2.observed_address) == (True, "192.0.2.9")
    store.close()


def test_unreachable_agents_are_kept_until_reachable_or_gone(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for name, token in (("pc1", "t1"), ("pc2", "t2"), ("pc3", "t3"), ("pc4", "t4")):
        store.save_client(_client(name, token))
        store.set_unreachable(name, True)
    store.set_unreachable("pc1", False)  # it answered a tickle
    store.remove_clients(["pc2"])  # forgotten by the operator
    # pc3 is no longer the NS's client of this task server
    store.replace_clients([_info("pc4", "t4"), _info("pc1", "t1")])
    assert set(store.unreachable) == {"pc4"}
    store.close()

    reopened = Store(tmp_path)
    assert set(reopened.unreachable) == {"pc4"}
    reopened.close()
