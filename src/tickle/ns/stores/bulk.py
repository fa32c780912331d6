"""PostgreSQL: many rows in one statement of one JSON parameter (`json_to_recordset`).

SQLAlchemy's batched `INSERT ... VALUES (...), (...)` binds every value of every row: psycopg
parses a statement of thousands of placeholders anew each time (it caches only short ones), which
took most of the NS's CPU in a run now on 10,000 computers and in the status-event ingest. An array
per column (`unnest`) made the statement short, but psycopg dumps arrays in Python, element by
element (a regular expression each to quote a JSON body): a third of the ingest's CPU. Here the
rows travel as one JSON document, written by pydantic-core (a status event's model goes in as it
is) and read by the server; the statement is short and parsed once.

A JSON column's value is a value in the row (nested in the document); a fixed one is its JSON
text.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pydantic_core
from sqlalchemy import Column, Table, TextClause, text
from sqlalchemy.dialects import postgresql

_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]


def insert(
    table: Table,
    varying: Sequence[str],
    fixed: Sequence[str] = (),
    returning: Sequence[str] = (),
    skip_conflicts_on: str | None = None,
    replace_on: Sequence[str] = (),
) -> TextClause:
    """INSERT one row per row of the `rows` parameter (see `rows`; in their order) with its
    `varying` columns, the `fixed` columns the same in every row (parameters of their names).

    `skip_conflicts_on`: a unique column; a row whose value is there already (or twice in the
    rows) is left out (then `returning` names the rows inserted, not those skipped).
    `replace_on`: the columns of a unique key; a row whose key is there already replaces that
    row's other `varying` columns (the rows must not hold a key twice)."""
    return _insert(
        table, tuple(varying), tuple(fixed), tuple(returning), skip_conflicts_on, tuple(replace_on)
    )


def update(table: Table, key: str, varying: Sequence[str]) -> TextClause:
    """UPDATE the row of each row's `key`, setting its `varying` columns (parameter `rows`)."""
    return _update(table, key, tuple(varying))


def rows(values: Sequence[Mapping[str, Any]], exclude: Any = None) -> str:
    """The `rows` parameter of `insert` and `update`: the rows as one JSON document (keys that
    are not the statement's columns are ignored; `exclude`: pydantic-core's, e.g. fields of a
    model in a row). A float JSON cannot carry (NaN, infinite) goes as the text PostgreSQL's
    float input reads."""
    return pydantic_core.to_json(values, exclude=exclude, inf_nan_mode="strings").decode()


def json_text(value: Any) -> str:
    """A fixed JSON column's value as the text this module binds."""
    return json.dumps(value)


@functools.cache
def _insert(
    table: Table,
    varying: tuple[str, ...],
    fixed: tuple[str, ...],
    returning: tuple[str, ...],
    skip_conflicts_on: str | None,
    replace_on: tuple[str, ...],
) -> TextClause:
    values = [f"u.{_q(c)}" for c in varying]
    values += [f"CAST(:{c} AS {_type(table.c[c])})" for c in fixed]
    names = ", ".join(_q(c) for c in (*varying, *fixed))
    sql = (
        f"INSERT INTO {_q(table.name)} ({names}) SELECT {', '.join(values)}"  # noqa: S608 (names: the models'; values bound)
        f" FROM {_recordset(table, varying, ordered=True)} ORDER BY u._n"
    )
    if skip_conflicts_on is not None:
        sql += f" ON CONFLICT ({_q(skip_conflicts_on)}) DO NOTHING"
    elif replace_on:
        sets = ", ".join(f"{_q(c)} = EXCLUDED.{_q(c)}" for c in varying if c not in replace_on)
        sql += f" ON CONFLICT ({', '.join(_q(c) for c in replace_on)}) DO UPDATE SET {sets}"
    if returning:
        sql += f" RETURNING {', '.join(_q(c) for c in returning)}"
    return text(sql)


@functools.cache
def _update(table: Table, key: str, varying: tuple[str, ...]) -> TextClause:
    sets = ", ".join(f"{_q(c)} = u.{_q(c)}" for c in varying)
    # the rows to update are found by their keys' index: joined to the recordset alone (which
    # the planner takes for 100 rows whatever it holds), they were found by a scan of the whole
    # table per statement (a fleet's every status-event batch read every execution)
    return text(
        f"WITH u AS MATERIALIZED (SELECT * FROM {_recordset(table, (key, *varying))})"  # noqa: S608
        f" UPDATE {_q(table.name)} SET {sets} FROM u"
        f" WHERE {_q(table.name)}.{_q(key)} = ANY(ARRAY(SELECT u.{_q(key)} FROM u))"
        f" AND {_q(table.name)}.{_q(key)} = u.{_q(key)}"
    )


def _recordset(table: Table, names: Sequence[str], ordered: bool = False) -> str:
    """The `rows` parameter as rows `u` of the columns `names` (`ordered`: and their place `_n`)."""
    typed = ", ".join(f"{_q(c)} {_type(table.c[c])}" for c in names)
    rows = "json_to_recordset(CAST(:rows AS JSON))"
    if not ordered:
        return f"{rows} AS u({typed})"
    # WITH ORDINALITY takes a column definition list only inside ROWS FROM
    named = ", ".join(_q(c) for c in names)
    return f"ROWS FROM ({rows} AS ({typed})) WITH ORDINALITY AS u({named}, _n)"


def _type(column: Column[Any]) -> str:
    return str(column.type.compile(dialect=_DIALECT))


def _q(name: str) -> str:
    return f'"{name}"'
