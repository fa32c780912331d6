"""PostgreSQL: many rows in one statement of a few array parameters (`unnest`).

SQLAlchemy's batched `INSERT ... VALUES (...), (...)` binds every value of every row: psycopg
parses a statement of thousands of placeholders anew each time (it caches only short ones), which
took most of the NS's CPU in a run now on 10,000 computers and in the status-event ingest. Here
each column is one array: the statement is short, parsed once, its arrays dumped in C.

JSON columns travel as text arrays, cast back row by row; a JSON value is given as its JSON text.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import JSON, Column, Table, TextClause, text
from sqlalchemy.dialects import postgresql

_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]


def insert(
    table: Table, varying: Sequence[str], fixed: Sequence[str] = (), returning: Sequence[str] = ()
) -> TextClause:
    """INSERT one row per element of the `varying` columns' arrays (in their order), the `fixed`
    columns the same in every row; parameters named after the columns (see `columns`)."""
    return _insert(table, tuple(varying), tuple(fixed), tuple(returning))


def update(table: Table, key: str, varying: Sequence[str]) -> TextClause:
    """UPDATE the rows whose `key` is in the `key` array, each from its elements of the others."""
    return _update(table, key, tuple(varying))


def columns(rows: Iterable[dict[str, Any]], names: Sequence[str]) -> dict[str, list[Any]]:
    """The parameters of `insert` or `update`: each column's values as a list."""
    out: dict[str, list[Any]] = {name: [] for name in names}
    for row in rows:
        for name in names:
            out[name].append(row[name])
    return out


def json_text(value: Any) -> str:
    """A JSON column's value as the text this module binds."""
    return json.dumps(value)


@functools.cache
def _insert(
    table: Table, varying: tuple[str, ...], fixed: tuple[str, ...], returning: tuple[str, ...]
) -> TextClause:
    values = [_from_array(table.c[c], f"u.{_q(c)}") for c in varying]
    values += [f"CAST(:{c} AS {_type(table.c[c])})" for c in fixed]
    names = ", ".join(_q(c) for c in (*varying, *fixed))
    sql = (
        f"INSERT INTO {_q(table.name)} ({names}) SELECT {', '.join(values)}"  # noqa: S608 (names: the models'; values bound)
        f" FROM {_unnest(table, varying)} WITH ORDINALITY"
        f" AS u({', '.join(_q(c) for c in varying)}, _n) ORDER BY u._n"
    )
    if returning:
        sql += f" RETURNING {', '.join(_q(c) for c in returning)}"
    return text(sql)


@functools.cache
def _update(table: Table, key: str, varying: tuple[str, ...]) -> TextClause:
    sets = ", ".join(f"{_q(c)} = {_from_array(table.c[c], f'u.{_q(c)}')}" for c in varying)
    names = ", ".join(_q(c) for c in (key, *varying))
    return text(
        f"UPDATE {_q(table.name)} SET {sets} FROM {_unnest(table, (key, *varying))}"  # noqa: S608
        f" AS u({names}) WHERE {_q(table.name)}.{_q(key)} = u.{_q(key)}"
    )


def _unnest(table: Table, names: Sequence[str]) -> str:
    arrays = (f"CAST(:{c} AS {_array_type(table.c[c])})" for c in names)
    return f"unnest({', '.join(arrays)})"


def _type(column: Column[Any]) -> str:
    return str(column.type.compile(dialect=_DIALECT))


def _array_type(column: Column[Any]) -> str:
    return "TEXT[]" if isinstance(column.type, JSON) else f"{_type(column)}[]"


def _from_array(column: Column[Any], element: str) -> str:
    return f"CAST({element} AS JSON)" if isinstance(column.type, JSON) else element


def _q(name: str) -> str:
    return f'"{name}"'
