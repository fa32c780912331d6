"""The execution lifecycle as pure functions: status events in any order, no database."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import pytest

from tickle import messages as m
from tickle.ns.lifecycle import Progress, apply, finished_now

NOW = 1000.0


def event(kind: str, at: float, **fields: Any) -> m.StatusEvent:
    return m.StatusEvent(
        event_id=str(uuid.uuid4()), execution_id=1, computer="pc1", kind=kind, at=at, **fields
    )  # fmt: skip


def apply_all(events: list[m.StatusEvent], steps: tuple[str, ...] = ()) -> Progress:
    progress = Progress()
    for e in events:
        progress = apply(progress, e, NOW, steps)
    return progress


FINISHED = event("finished", 4.0, exit_code=0, status="succeeded", output_tail="hi\n", cached_at=5)
IN_ORDER = [
    event("agent_tickled", 1.0),
    event("agent_pulled", 2.0, via="tickle"),
    event("started", 3.0),
    FINISHED,
]


def test_events_in_order_take_a_pending_execution_through_to_succeeded() -> None:
    statuses = []
    progress = Progress()
    for e in IN_ORDER:
        progress = apply(progress, e, NOW)
        statuses.append(progress.status)
    assert statuses == ["pending", "delivered", "running", "succeeded"]
    assert progress == Progress(
        status="succeeded", via="tickle", agent_tickled_at=1.0, agent_pulled_at=2.0,
        started_at=3.0, finished_at=4.0, exit_code=0, output_tail="hi\n", cached_at_ts=5.0,
        recorded_at=NOW,
    )  # fmt: skip


@pytest.mark.parametrize("order", list(itertools.permutations(IN_ORDER)))
def test_events_in_any_order_end_in_the_same_progress(order: tuple[m.StatusEvent, ...]) -> None:
    assert apply_all(list(order)) == apply_all(IN_ORDER)


def test_late_started_never_reopens_a_finished_execution() -> None:
    finished = apply_all(IN_ORDER)
    assert apply(finished, event("started", 9.0), NOW + 1) == finished


def test_a_step_time_is_kept_from_its_first_event() -> None:
    pulled = apply_all([event("agent_pulled", 2.0, via="tickle")])
    again = apply(pulled, event("agent_pulled", 7.0, via="poll"), NOW)
    assert (again.agent_pulled_at, again.via) == (2.0, "tickle")


def test_a_second_finished_changes_nothing() -> None:
    finished = apply_all(IN_ORDER)
    failed = event("finished", 8.0, exit_code=1, status="failed")
    assert apply(finished, failed, NOW + 1) == finished


@pytest.mark.parametrize(("exit_code", "status"), [(0, "succeeded"), (3, "failed")])
def test_finished_without_a_status_is_judged_by_its_exit_code(exit_code: int, status: str) -> None:
    assert apply_all([event("finished", 4.0, exit_code=exit_code)]).status == status


def test_finished_with_a_final_status_keeps_it() -> None:
    timed_out = event("finished", 4.0, exit_code=0, status="timed_out")
    assert apply_all([timed_out]).status == "timed_out"


def test_step_results_are_named_ordered_and_a_repeated_step_replaces_its_result() -> None:
    steps = ("build", "test")
    progress = apply_all(
        [
            event("step_finished", 2.0, step=1, exit_code=1, status="failed", step_started_at=1.5),
            event(
                "step_finished", 1.0, step=0, exit_code=0, status="succeeded", step_started_at=0.5
            ),
            event(
                "step_finished", 3.0, step=1, exit_code=0, status="succeeded", step_started_at=2.5
            ),
        ],
        steps,
    )
    assert progress.step_results == (
        {"step": 0, "name": "build", "exit_code": 0, "status": "succeeded", "started_at": 0.5,
         "finished_at": 1.0},
        {"step": 1, "name": "test", "exit_code": 0, "status": "succeeded", "started_at": 2.5,
         "finished_at": 3.0},
    )  # fmt: skip
    assert progress.status == "pending"  # a step result does not move the status


def test_a_step_beyond_the_execution_s_steps_is_named_by_its_index() -> None:
    progress = apply_all([event("step_finished", 1.0, step=5, exit_code=0)], ("only",))
    assert progress.step_results == (
        {"step": 5, "name": "step5", "exit_code": 0, "status": "", "started_at": None,
         "finished_at": 1.0},
    )  # fmt: skip


def test_finished_now_only_for_the_event_that_finished_it() -> None:
    running = apply_all(IN_ORDER[:3])
    finished = apply(running, FINISHED, NOW)
    assert finished_now(running, finished)
    assert not finished_now(finished, apply(finished, FINISHED, NOW))
    assert not finished_now(Progress(), running)


def test_a_task_s_finished_carries_its_one_step_result() -> None:
    finished = event("finished", 4.0, step=0, exit_code=2, status="failed", step_started_at=3.0)
    progress = apply_all([finished], ("only",))
    assert progress.step_results == (
        {"step": 0, "name": "only", "exit_code": 2, "status": "failed", "started_at": 3.0,
         "finished_at": 4.0},
    )  # fmt: skip


def test_a_lost_execution_takes_the_status_its_agent_reports_late_and_counts_once() -> None:
    lost = apply_all(IN_ORDER[:3])._replace(status="lost", finished_at=10.0)
    late = event("finished", 11.0, step=0, status="interrupted")
    after = apply(lost, late, NOW)
    assert after.status == "interrupted"
    assert after.step_results[0]["status"] == "interrupted"
    assert not finished_now(lost, after)  # it was counted when it was found lost
    assert apply(after, event("finished", 12.0, status="succeeded", exit_code=0), NOW) == after


def test_an_expired_execution_its_agent_started_just_before_takes_what_the_agent_reports() -> None:
    expired = apply_all(IN_ORDER[:2])._replace(status="expired", finished_at=10.0)
    after = apply(expired, FINISHED, NOW)
    assert after.status == "succeeded"
    assert not finished_now(expired, after)


def test_a_cancelled_execution_stays_cancelled_whatever_its_agent_reports() -> None:
    cancelled = apply_all(IN_ORDER[:3])._replace(status="cancelled", finished_at=10.0)
    assert apply(cancelled, FINISHED, NOW) == cancelled
