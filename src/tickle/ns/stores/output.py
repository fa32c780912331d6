"""The steps' output of executions, as their agents kept it (read by `GET .../output` only, so
listing runs never loads it)."""

from __future__ import annotations

from sqlalchemy import select

from tickle import messages as m
from tickle.ns.database import Database
from tickle.ns.errors import NotFound
from tickle.ns.models import Execution, ExecutionOutput


class OutputStore:
    """Reads `execution_outputs` (the delivery store writes it as status events come)."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def output(self, execution_id: int, step: int | None = None) -> m.ExecutionOutputOut:
        """Each step's output (or one step's), in step order; a step without output is left out."""
        with self._db.reading() as s:
            ex = s.get(Execution, execution_id)
            if ex is None:
                raise NotFound(f"execution {execution_id} does not exist")
            if step is not None and not 0 <= step < len(ex.steps):
                raise NotFound(f"execution {execution_id} has no step {step}")
            query = select(ExecutionOutput).where(ExecutionOutput.execution_id == execution_id)
            if step is not None:
                query = query.where(ExecutionOutput.step == step)
            names = [str(spec.get("name", "")) for spec in ex.steps]
            return m.ExecutionOutputOut(
                execution_id=execution_id,
                steps=[
                    m.StepOutput(
                        step=row.step,
                        name=names[row.step] if row.step < len(names) else f"step{row.step}",
                        stdout=row.stdout,
                        stderr=row.stderr,
                    )
                    for row in s.scalars(query.order_by(ExecutionOutput.step))
                ],
            )
