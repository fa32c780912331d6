"""SQLite: the statements a run-now waits for, run by `sqlite3` itself rather than by SQLAlchemy.

A run-now's two transactions on its way to the agent (the run's own, and the task server's work
pull) are a handful of short statements each. Timed cold, as an operator's run-now finds the NS
(idle 100 ms before each: issue 10's S1; `make bench-micro`'s `ns_cold_ms`), SQLAlchemy's
execution around them (its connection and transaction objects, the execution context, parameter
and result processing) cost more than the statements: on the driver a run-now on one computer
took 0.9-1.0 ms instead of 1.8-2.0, its work pull 0.7 instead of 1.4-1.6.

Each statement is still written once, in Core: `DriverSql` compiles it for SQLite once, and
takes the same parameters by name as under Core. A list parameter (an expanding `IN`) becomes as
many placeholders as the list has values when run; a constant list is written into the SQL.
Values go to the driver as they are: a JSON column's value is its JSON text, read back as text.
`Database.writing_driver` gives the transaction, a `Driver`, which fires the engine's cursor and
commit events as SQLAlchemy does: what watches the engine (tests, tracing) sees these too.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Engine, literal
from sqlalchemy.dialects import sqlite
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

_DIALECT = sqlite.dialect()


class Driver:
    """A write transaction on SQLite's own connection (see `Database.writing_driver`).

    The engine's `before_cursor_execute`, `after_cursor_execute` and `commit` listeners are
    called with this object in place of the Core connection, as SQLAlchemy calls them (a
    `before_cursor_execute` listener may fail the statement, or return it changed)."""

    def __init__(self, db: sqlite3.Connection, engine: Engine) -> None:
        self.db = db
        self._dispatch = engine.dispatch

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        """Run one statement with its positional parameters."""
        if not (self._dispatch.before_cursor_execute or self._dispatch.after_cursor_execute):
            return self.db.execute(sql, params)
        cursor = self.db.cursor()
        for before in self._dispatch.before_cursor_execute:  # each returns both, as in Core
            sql, params = before(self, cursor, sql, params, None, False)
        cursor.execute(sql, params)
        for after in self._dispatch.after_cursor_execute:
            after(self, cursor, sql, params, None, False)
        return cursor

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement once per row of parameters."""
        listed: Sequence[Any] = list(rows)
        for before in self._dispatch.before_cursor_execute:
            sql, listed = before(self, None, sql, listed, None, True)
        self.db.executemany(sql, listed)
        for after in self._dispatch.after_cursor_execute:
            after(self, None, sql, listed, None, True)

    def begin(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.db.execute("COMMIT")
        for committed in self._dispatch.commit:
            committed(self)

    def rollback(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")


class DriverSql:
    """A Core statement compiled once for SQLite's driver; run by `execute`."""

    def __init__(self, statement: ClauseElement) -> None:
        compiled = statement.compile(dialect=_DIALECT)
        assert isinstance(compiled, SQLCompiler)
        sql = str(compiled)
        self._lists: set[str] = set()  # the list parameters: placeholders as many as values
        constant: set[str] = set()
        for name, bind in compiled.binds.items():
            token = f"(__[POSTCOMPILE_{name}])"
            if token not in sql:
                continue
            if bind.value is None:
                self._lists.add(name)
            else:  # a constant list: its values in the SQL (the query planner sees them)
                values = ", ".join(_literal(value) for value in bind.value)
                sql = sql.replace(token, f"({values})")
                constant.add(name)
        # the parameters in their places' order (a name used twice comes twice)
        self._names = [name for name in compiled.positiontup or () if name not in constant]
        # a value written in the statement (`.values(column=value)`): its own, as under Core
        self._values = {
            name: bind.value
            for name, bind in compiled.binds.items()
            if bind.value is not None and name not in constant
        }
        self.sql = sql

    def execute(self, driver: Driver, params: Mapping[str, Any]) -> sqlite3.Cursor:
        """Run it in `driver`'s transaction with `params` (by name, as for Core)."""
        if self._values:
            params = {**self._values, **params}
        if not self._lists:
            return driver.execute(self.sql, [params[name] for name in self._names])
        sql = self.sql
        values: list[Any] = []
        for name in self._names:
            if name in self._lists:
                listed = list(params[name])
                sql = sql.replace(f"(__[POSTCOMPILE_{name}])", f"({', '.join('?' * len(listed))})")
                values += listed
            else:
                values.append(params[name])
        return driver.execute(sql, values)


def _literal(value: Any) -> str:
    return str(literal(value).compile(dialect=_DIALECT, compile_kwargs={"literal_binds": True}))
