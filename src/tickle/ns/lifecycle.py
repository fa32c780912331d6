"""The execution lifecycle: how status events move an execution forward.

Events may arrive out of order (separate outboxes, retries): timestamps are set once and the status
only moves forward (pending → delivered → running → a final status), so a late `started` never
reopens a finished execution. Two final statuses are provisional: `lost` (the NS stopped hearing
from the computer) and `expired` (the NS saw no start by the run's expiry — the agent may have
started it just before) give way to the `finished` its agent reports. Pure functions on plain
values: the delivery store reads an execution into a `Progress`, applies each event here and
writes the result back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from tickle import agentapi
from tickle import messages as m

# a status event as the routes read it (pydantic) or as the NS's fast path does (msgspec: the same
# fields and limits, tests/shared/test_agentapi.py)
Event = m.StatusEvent | agentapi.StatusEvent

_ORDER = {"pending": 0, "delivered": 1, "running": 2}  # final statuses come after all of these
# final statuses the NS gave without word from the agent: what the agent reports replaces them
_PROVISIONAL = frozenset({"lost", "expired"})


class Progress(NamedTuple):
    """What status events set on an execution (its columns of the same names).

    A named tuple: its `_replace` costs a third of a frozen dataclass's `replace`, which was a
    tenth of the NS's CPU in the status-event ingest."""

    status: str = "pending"
    via: str | None = None
    agent_tickled_at: float | None = None
    agent_pulled_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    output_tail: str | None = None
    cached_at_ts: float | None = None
    recorded_at: float | None = None
    # as stored: step, name, exit_code, status, started_at, finished_at
    step_results: tuple[dict[str, Any], ...] = ()


def apply(progress: Progress, event: Event, now: float, step_names: Sequence[str] = ()) -> Progress:
    """`progress` after one status event recorded at `now` (`step_names`: the execution's steps)."""
    if event.kind == "agent_tickled":
        return progress._replace(agent_tickled_at=progress.agent_tickled_at or event.at)
    if event.kind == "agent_pulled":
        return progress._replace(
            agent_pulled_at=progress.agent_pulled_at or event.at,
            via=progress.via or event.via,
            status=_advance(progress.status, "delivered"),
        )
    if event.kind == "started":
        return progress._replace(
            started_at=progress.started_at or event.at,
            status=_advance(progress.status, "running"),
        )
    if event.kind == "step_finished" and event.step is not None:
        results = _with_step(progress.step_results, event.step, event, step_names)
        return progress._replace(step_results=results)
    if event.kind == "finished" and (
        progress.status not in m.FINAL_STATUSES or progress.status in _PROVISIONAL
    ):
        results = progress.step_results
        if event.step is not None and all(r.get("step") != event.step for r in results):
            # a task's one step, or the step a job was stopped in, is reported by `finished`
            results = _with_step(results, event.step, event, step_names)
        return progress._replace(
            step_results=results,
            status=_final_status(event),
            finished_at=event.at,
            exit_code=event.exit_code,
            output_tail=event.output_tail,
            cached_at_ts=event.cached_at,
            recorded_at=now,
        )
    return progress


def finished_now(before: Progress, after: Progress) -> bool:
    """Whether the event that turned `before` into `after` finished the execution (a lost one's
    late report is not: it was counted when it was found lost)."""
    return before.status not in m.FINAL_STATUSES and after.status in m.FINAL_STATUSES


def _advance(status: str, to: str) -> str:
    if status in _ORDER and _ORDER[status] < _ORDER[to]:
        return to
    return status


def _with_step(
    results: tuple[dict[str, Any], ...], step: int, event: Event, step_names: Sequence[str]
) -> tuple[dict[str, Any], ...]:
    # a step reported again replaces its earlier result; the results stay in step order
    name = step_names[step] if step < len(step_names) else f"step{step}"
    kept = [r for r in results if r.get("step") != step]
    status = event.status or ""
    result = {
        "step": step, "name": name, "exit_code": event.exit_code, "status": status,
        "started_at": event.step_started_at, "finished_at": event.at,
    }  # fmt: skip
    return tuple(sorted([*kept, result], key=lambda r: int(r["step"])))


def _final_status(event: Event) -> str:
    # a `finished` event without a final status is judged by its exit code
    if event.status in m.FINAL_STATUSES:
        return event.status
    return "succeeded" if event.exit_code == 0 else "failed"
