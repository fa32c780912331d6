"""The agent's durable state in SQLite: credentials, policy, the executions it claimed, and the
high-water marks of the tickles its listener accepted (replay protection across restarts).

Claiming an execution is one atomic INSERT keyed by its id: whichever pull (tickle, poll or check
now) claims it first runs it, every other pull that returns it skips it, also across restarts. A
claimed execution that never finished (the agent died while it ran) is reported `interrupted` at
the next start, not run again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from tickle import localdb
from tickle.agentapi import AgentPolicy, decode, encode

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS credentials ("
    " url TEXT PRIMARY KEY, ts_name TEXT NOT NULL, name TEXT NOT NULL,"
    " token TEXT NOT NULL, tickle_key TEXT NOT NULL, registered_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS policy (id INTEGER PRIMARY KEY CHECK (id = 1), body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS executions ("
    " execution_id INTEGER PRIMARY KEY, claimed_at REAL NOT NULL, via TEXT,"
    " finished INTEGER NOT NULL DEFAULT 0, finished_at REAL, status TEXT)",
)


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a task server handed out at registration."""

    url: str
    ts_name: str
    name: str
    token: str
    tickle_key: str  # base64
    registered_at: float


class AgentState:
    """The agent's SQLite database (WAL, synchronous FULL) in its state directory."""

    def __init__(self, path: Path) -> None:
        self._db = localdb.connect(path, _SCHEMA, any_thread=True)
        self.tickle_marks = localdb.HighWaterMarks(self._db)

    def close(self) -> None:
        self._db.close()

    # --- credentials ---------------------------------------------------------------------------

    def save_credentials(self, creds: Credentials) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO credentials VALUES (?, ?, ?, ?, ?, ?)",
            (creds.url, creds.ts_name, creds.name, creds.token, creds.tickle_key,
             creds.registered_at),
        )  # fmt: skip

    def current_credentials(self, urls: list[str], name: str) -> Credentials | None:
        """The latest registration with one of `urls` under this agent's `name`."""
        rows = self._db.execute(
            "SELECT url, ts_name, name, token, tickle_key, registered_at FROM credentials"
            " ORDER BY registered_at DESC"
        ).fetchall()
        for row in rows:
            creds = Credentials(*row)
            if creds.url in urls and creds.name == name:
                return creds
        return None

    def identity(self) -> str:
        """This agent's identity, made once: every registration brings it (see localdb)."""
        return localdb.identity(self._db)

    # --- policy --------------------------------------------------------------------------------

    def save_policy(self, policy: AgentPolicy) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO policy (id, body) VALUES (1, ?)", (encode(policy),)
        )

    def policy(self) -> AgentPolicy | None:
        row = self._db.execute("SELECT body FROM policy WHERE id = 1").fetchone()
        return decode(row[0], AgentPolicy) if row else None

    # --- executions ----------------------------------------------------------------------------

    def claim(self, execution_id: int, via: str | None = None) -> bool:
        """Claim an execution to run; False when it was claimed before (never run it twice)."""
        cur = self._db.execute(
            "INSERT OR IGNORE INTO executions (execution_id, claimed_at, via) VALUES (?, ?, ?)",
            (execution_id, time.time(), via),
        )
        return cur.rowcount == 1

    def mark_finished(self, execution_id: int, status: str) -> None:
        self._db.execute(
            "UPDATE executions SET finished = 1, finished_at = ?, status = ?"
            " WHERE execution_id = ?",
            (time.time(), status, execution_id),
        )

    def unfinished(self) -> list[int]:
        """Executions claimed but never finished, oldest first."""
        rows = self._db.execute(
            "SELECT execution_id FROM executions WHERE finished = 0 ORDER BY claimed_at"
        ).fetchall()
        return [int(r[0]) for r in rows]

    def counts(self) -> dict[str, int]:
        """Executions by status (`running` for claimed and unfinished)."""
        rows = self._db.execute(
            "SELECT CASE WHEN finished = 0 THEN 'running' ELSE status END, count(*)"
            " FROM executions GROUP BY 1"
        ).fetchall()
        return {str(r[0]): int(r[1]) for r in rows}
