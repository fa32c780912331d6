"""The NS database closes every SQLite connection it opened, also one still in use at close."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import text

from tickle.ns.database import Database


def test_a_connection_in_use_at_close_is_closed_when_given_back(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/ns.db")
    conn = db.engine.connect()  # as a request thread holds one
    conn.execute(text("SELECT 1"))
    raw = conn.connection.dbapi_connection
    db.close()  # the NS stops meanwhile
    conn.close()  # the thread finishes
    unraisable: list[Any] = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        del conn
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert not unraisable, [str(u.exc_value) for u in unraisable]
    assert raw is not None
    try:
        raw.execute("SELECT 1")
        still_open = True
    except Exception:
        still_open = False
    assert not still_open, "the connection given back after close was left open"
