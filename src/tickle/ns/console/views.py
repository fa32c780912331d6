"""What the console's templates show, derived from the API's messages: times, counts, filters, the
live grid's rows and the waterfall's bars."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any, cast, get_args

from tickle import messages as m
from tickle.ns.stores.history import RunFilter
from tickle.ns.stores.run_list import GridRow

# the statuses a run's bar shows, in order: every execution status
STATUS_ORDER: tuple[str, ...] = get_args(m.ExecutionStatus)
# the computer states the fleet page counts and filters by
STATES = ("online", "offline", "reachable", "unreachable", "cem", "clock_skewed", "unknown", "nat")


def when(at: float | None) -> str:
    """A time as UTC ISO-8601 to the second ("" when unset)."""
    if at is None:
        return ""
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(at: float | None) -> str:
    if at is None:
        return "never"
    s = max(0, int(time.time() - at))
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}min ago"
    return f"{s // 3600}h ago"


def ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.0f} ms"


def offset(seconds: float | None) -> str:
    """A clock offset ("" when unmeasured): positive when the peer's clock is ahead."""
    return "" if seconds is None else f"{seconds:+.1f} s"


def computer_states(c: m.ComputerOut) -> list[str]:
    """The states a computer counts in (online or offline, its tickle state, and nat when NAT
    was detected)."""
    return [c.liveness, c.tickle_state, *(["nat"] if c.nat_detected else [])]


def run_filter(form: dict[str, str]) -> RunFilter:
    """The runs page's filters (query strings, "" when unset) as the history's filter; a
    ValueError naming the field that is wrong."""
    status = form.get("status", "")
    if status and status not in STATUS_ORDER:
        raise ValueError(f"status: {status!r} is not one of {', '.join(STATUS_ORDER)}")
    return RunFilter(
        cast("m.ExecutionStatus | None", status or None),
        _id(form, "task_id"),
        _id(form, "job_id"),
        form.get("computer") or None,
        _time(form, "since"),
        _time(form, "until"),
    )


def _id(form: dict[str, str], field: str) -> int | None:
    text = form.get(field, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) > m.DB_INT_MAX:
        raise ValueError(f"{field}: {text!r} is not an id")
    return int(text)


def _time(form: dict[str, str], field: str) -> datetime | None:
    """A time from a datetime-local field (taken as UTC) or ISO 8601 with its offset."""
    text = form.get(field, "").strip()
    if not text:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{field}: {text!r} is not a time like 2026-01-31T14:00") from None
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def state_counts(computers: list[m.ComputerOut]) -> dict[str, int]:
    counts = Counter(s for c in computers for s in computer_states(c))
    return {state: counts.get(state, 0) for state in STATES}


def all_groups(computers: list[m.ComputerOut]) -> list[str]:
    return sorted({g for c in computers for g in c.groups})


def filter_computers(
    computers: list[m.ComputerOut],
    state: str | None,
    task_server: str | None,
    group: str | None,
) -> list[m.ComputerOut]:
    return [
        c
        for c in computers
        if (not state or state in computer_states(c))
        and (not task_server or c.task_server == task_server)
        and (not group or group in c.groups)
    ]


def status_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts: Counter[str] = Counter(row["status"] for row in rows)
    return {status: counts.get(status, 0) for status in STATUS_ORDER}


def grid_rows(grid: list[GridRow]) -> list[dict[str, Any]]:
    """One row per execution: its status, via, and each step's time after `created` (ms)."""
    rows = []
    for e in grid:
        created = e.times[0]
        cells = {
            step: None if at is None or created is None else round((at - created) * 1000)
            for step, at in zip(m.TIMELINE_STEPS, e.times, strict=True)
        }
        rows.append(
            {
                "id": e.id,
                "computer": e.computer,
                "status": e.status,
                "via": e.via or "",
                "final": e.status in m.FINAL_STATUSES,
                "cells": cells,
            }
        )
    return rows


def waterfall(ex: m.ExecutionOut, width: int = 600) -> dict[str, Any]:
    """The execution's hops as bars: each from the previous stamped step to its own step, placed
    on one time axis from `created` to the last stamped step (SVG coordinates, `width` wide)."""
    stamped = [(t.step, t.at) for t in ex.timeline if t.at is not None]
    if not stamped:
        return {"bars": [], "total_ms": 0, "width": width}
    start = stamped[0][1]
    total = max((at for _, at in stamped), default=start) - start
    scale = width / total if total > 0 else 0.0
    bars = []
    previous = start
    for step, at in stamped:
        bars.append(
            {
                "step": step,
                "x": round((previous - start) * scale, 1),
                "w": max(2.0, round((at - previous) * scale, 1)),
                "hop_ms": round((at - previous) * 1000, 1),
                "at_ms": round((at - start) * 1000, 1),
            }
        )
        previous = max(previous, at)
    missing = [t.step for t in ex.timeline if t.at is None]
    return {"bars": bars, "total_ms": round(total * 1000, 1), "width": width, "missing": missing}


def status_bar(statuses: dict[str, int], total: int, width: int = 200) -> list[dict[str, Any]]:
    """A run's status bar: one segment per status present, in STATUS_ORDER (SVG coordinates)."""
    segments, x = [], 0.0
    for status in STATUS_ORDER:
        n = statuses.get(status, 0)
        if n and total:
            w = width * n / total
            segments.append({"status": status, "n": n, "x": round(x, 1), "w": round(w, 1)})
            x += w
    return segments
