"""The lean read of one run's grid that the console's run page and its live stream repeat every
tick (the list of runs is the history store's)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select

from tickle import messages as m
from tickle.ns.database import Database
from tickle.ns.models import Computer, Execution

# the execution column holding each timeline step's time, in the timeline's order
_STEP_COLUMNS = [
    getattr(Execution, "cached_at_ts" if step == "cached_at_ts" else f"{step}_at")
    for step in m.TIMELINE_STEPS
]


@dataclass(frozen=True, slots=True)
class GridRow:
    """One execution of a run as the live grid shows it."""

    id: int
    computer: str
    status: str
    via: str | None
    times: tuple[float | None, ...]  # one per timeline step


class RunListStore:
    """Runs' grids in the NS database."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def grid(self, run_id: int) -> list[GridRow]:
        """The run's executions with their step times, read column by column (no ORM objects:
        the live stream reads a run of 1,000 computers every tick)."""
        with self._db.reading() as s:
            rows = s.execute(
                select(Execution.id, Computer.name, Execution.status, Execution.via, *_STEP_COLUMNS)
                .join(Computer, Execution.computer_id == Computer.id)
                .where(Execution.run_id == run_id)
                .order_by(Execution.id)
            )
            return [GridRow(r[0], r[1], r[2], r[3], tuple(r[4:])) for r in rows]
