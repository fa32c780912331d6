"""The task server's own state in SQLite (WAL): NS credentials, clients, work cache, settings,
and the high-water mark of the NS tickles its listener accepted (replay protection across
restarts).

The status-event outbox lives in its own file (`tickle.outbox.Outbox`). Everything here is small
and local, so the calls are synchronous; each write is one short transaction.

What every agent request reads is also held in memory, written through: the clients (by name and
by token), the settings, and the work the NS lists (parsed once, with its flags). An agent's pull
reads no SQLite and parses no JSON; SQLite is what a restart loads them from. Only this process
writes the database, so the copies cannot go stale; each is changed after its transaction
commits.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from pathlib import Path

from tickle import localdb
from tickle.messages import ClientInfo, ExecutionWork, SettingsOut, TaskServerCredentials

DB_FILE = "task-server.db"
OUTBOX_FILE = "outbox.db"
# Executions the NS stopped listing are kept this long so late events of their agent still pass
# the ownership check (an agent's outbox may deliver a retry after the NS recorded the finish).
TOMBSTONE_S = 7 * 86400.0
_IN_CHUNK = 500  # execution ids per `IN (...)` (SQLite allows 32,766 parameters, older 999)

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS credentials ("
    " id INTEGER PRIMARY KEY CHECK (id = 1), ns_url TEXT NOT NULL, body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS clients ("
    " name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE, tickle_key TEXT NOT NULL,"
    " tickle_host TEXT, tickle_port INTEGER NOT NULL, cem INTEGER NOT NULL,"
    " reported_address TEXT, observed_address TEXT)",
    "CREATE TABLE IF NOT EXISTS work ("
    " execution_id INTEGER PRIMARY KEY, computer TEXT NOT NULL, body TEXT NOT NULL,"
    " listed INTEGER NOT NULL DEFAULT 1, agent_tickled INTEGER NOT NULL DEFAULT 0,"
    " agent_pulled INTEGER NOT NULL DEFAULT 0, done INTEGER NOT NULL DEFAULT 0,"
    " updated_at REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS work_computer ON work (computer)",
    "CREATE TABLE IF NOT EXISTS settings (id INTEGER PRIMARY KEY CHECK (id = 1), body TEXT)",
    # executions the NS says were cancelled: never handed out again, the cancel handed instead
    "CREATE TABLE IF NOT EXISTS cancels (execution_id INTEGER PRIMARY KEY, at REAL NOT NULL)",
    # agents whose tickles went unanswered (their policy may long-poll), until one is answered
    "CREATE TABLE IF NOT EXISTS unreachable (name TEXT PRIMARY KEY)",
)


@dataclass(frozen=True, slots=True)
class Client:
    """An agent registered with this task server."""

    name: str
    token_sha256: str
    tickle_key: str  # base64
    tickle_host: str | None
    tickle_port: int
    cem: bool
    reported_address: str | None = None
    observed_address: str | None = None

    @property
    def tickle_addr(self) -> tuple[str, int] | None:
        """Where its tickles go: the address it gave, else the one it was seen from."""
        host = self.tickle_host or self.observed_address
        return (host, self.tickle_port) if host else None


@dataclass(frozen=True, slots=True)
class CachedWork:
    execution_id: int
    computer: str
    work: ExecutionWork
    agent_tickled: bool
    agent_pulled: bool
    done: bool
    json: str  # `work` as JSON (as the table keeps it): a pull's answer is made of it


class Store:
    """The task server's SQLite database in `state_dir`."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DB_FILE
        # one connection, used from the event loop's thread only (sqlite3 refuses other threads)
        self._db = localdb.connect(self.path, _SCHEMA)
        self.tickle_marks = localdb.HighWaterMarks(self._db)
        # read on every agent pull: kept in memory (small: the cancels of the last days)
        self.cancelled: frozenset[int] = frozenset(
            int(r[0]) for r in self._db.execute("SELECT execution_id FROM cancels")
        )
        self._unreachable = {str(r[0]) for r in self._db.execute("SELECT name FROM unreachable")}
        self._by_name: dict[str, Client] = {}
        self._by_token: dict[str, Client] = {}
        self._load_clients()
        row = self._db.execute("SELECT body FROM settings WHERE id = 1").fetchone()
        self._settings = SettingsOut.model_validate_json(row[0]) if row else None
        # the listed work, and per computer its unfinished part (execution id order)
        self._listed: dict[int, CachedWork] = {}
        self._unfinished: dict[str, dict[int, CachedWork]] = {}
        for r in self._db.execute(
            "SELECT * FROM work WHERE listed = 1 ORDER BY execution_id"
        ).fetchall():
            self._hold(_work(r))
        # per computer: its cancelled executions it has not reported finished
        self._cancels_of: dict[str, list[int]] = {}
        self._load_cancels_of()

    def close(self) -> None:
        self._db.close()

    # --- credentials from the NS ------------------------------------------------------------

    def credentials(self, ns_url: str) -> TaskServerCredentials | None:
        """The stored credentials, if they were issued by the NS at `ns_url`."""
        row = self._db.execute("SELECT ns_url, body FROM credentials WHERE id = 1").fetchone()
        if row is None or row[0] != ns_url:
            return None
        return TaskServerCredentials.model_validate_json(row[1])

    def identity(self) -> str:
        """This task server's identity, made once: every registration brings it (see localdb)."""
        return localdb.identity(self._db)

    def save_credentials(self, ns_url: str, creds: TaskServerCredentials) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO credentials (id, ns_url, body) VALUES (1, ?, ?)",
            (ns_url, creds.model_dump_json()),
        )

    # --- clients ------------------------------------------------------------------------------

    def _load_clients(self) -> None:
        self._by_name = {c.name: c for c in map(_client, self._db.execute("SELECT * FROM clients"))}
        self._by_token = {c.token_sha256: c for c in self._by_name.values()}

    def _keep_client(self, client: Client) -> None:
        old = self._by_name.get(client.name)
        if old is not None and self._by_token.get(old.token_sha256) is old:
            del self._by_token[old.token_sha256]
        self._by_name[client.name] = client
        self._by_token[client.token_sha256] = client

    def save_client(self, client: Client) -> None:
        self.save_clients([client])

    def save_clients(self, clients: Iterable[Client]) -> None:
        """Keep the clients registered together, in one transaction, in their order (a name
        registered anew, even later in the same group, replaces its old token)."""
        clients = list(clients)
        with localdb.transaction(self._db):
            for client in clients:
                self._db.execute("DELETE FROM clients WHERE name = ?", (client.name,))
                self._db.execute(
                    "INSERT INTO clients VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        client.name,
                        client.token_sha256,
                        client.tickle_key,
                        client.tickle_host,
                        client.tickle_port,
                        int(client.cem),
                        client.reported_address,
                        client.observed_address,
                    ),
                )
        for client in clients:
            self._keep_client(client)

    def replace_clients(self, infos: Iterable[ClientInfo]) -> None:
        """Make the client list the NS's, keeping the addresses this TS observed."""
        infos = list(infos)
        with localdb.transaction(self._db):
            keep = {c.name for c in infos}
            for (name,) in self._db.execute("SELECT name FROM clients").fetchall():
                if name not in keep:
                    self._db.execute("DELETE FROM clients WHERE name = ?", (name,))
                    self._db.execute("DELETE FROM unreachable WHERE name = ?", (name,))
            for c in infos:
                self._db.execute(
                    "INSERT INTO clients (name, token_sha256, tickle_key, tickle_host,"
                    " tickle_port, cem) VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (name) DO UPDATE SET token_sha256 = excluded.token_sha256,"
                    " tickle_key = excluded.tickle_key, tickle_host = excluded.tickle_host,"
                    " tickle_port = excluded.tickle_port, cem = excluded.cem",
                    (c.name, c.token_sha256, c.tickle_key, c.tickle_host, c.tickle_port, c.cem),
                )
        self._unreachable &= keep
        self._load_clients()

    def remove_clients(self, names: Iterable[str]) -> None:
        """Drop clients the NS no longer knows (forgotten): their tokens authenticate no more."""
        names = list(names)
        with localdb.transaction(self._db):
            self._db.executemany("DELETE FROM clients WHERE name = ?", [(n,) for n in names])
            self._db.executemany("DELETE FROM unreachable WHERE name = ?", [(n,) for n in names])
        self._unreachable.difference_update(names)
        for name in names:
            old = self._by_name.pop(name, None)
            if old is not None:
                self._by_token.pop(old.token_sha256, None)

    def client(self, name: str) -> Client | None:
        return self._by_name.get(name)

    def client_by_token(self, token_sha256: str) -> Client | None:
        return self._by_token.get(token_sha256)

    def clients(self) -> list[Client]:
        return sorted(self._by_name.values(), key=lambda c: c.name)

    @property
    def unreachable(self) -> AbstractSet[str]:
        """The agents declared tickle-unreachable, and not answered a tickle since (kept across
        restarts: an agent behind a firewall keeps its long-poll). Read on every pull: no copy."""
        return self._unreachable

    def set_unreachable(self, name: str, unreachable: bool) -> None:
        """Note whether `name`'s last tickle went unanswered (written only when it changes)."""
        if unreachable == (name in self._unreachable):
            return
        if unreachable:
            self._db.execute("INSERT OR IGNORE INTO unreachable (name) VALUES (?)", (name,))
        else:
            self._db.execute("DELETE FROM unreachable WHERE name = ?", (name,))
        if unreachable:
            self._unreachable.add(name)
        else:
            self._unreachable.discard(name)

    def set_observed_address(self, name: str, address: str) -> None:
        self._db.execute("UPDATE clients SET observed_address = ? WHERE name = ?", (address, name))
        old = self._by_name.get(name)
        if old is not None:
            self._keep_client(replace(old, observed_address=address))

    # --- the work cache -----------------------------------------------------------------------

    def reconcile(self, executions: Iterable[ExecutionWork]) -> list[int]:
        """Make the cache match the NS's list of unfinished work; return the new execution ids.

        Not synced (see `localdb.transaction`): the NS keeps the list, and gives all of it again
        to the pull a task server makes at start, so a power cut loses nothing the cache must
        keep; the sync sat between every run's work pull and the tickle to its agent."""
        now = time.time()
        listed = {w.execution_id: w for w in executions}
        new: list[int] = []
        relisted: list[int] = []
        with localdb.transaction(self._db, durable=False):
            # the listed work is in memory; only what is not needs the table
            unlisted = [eid for eid in listed if eid not in self._listed]
            known = self._existing(unlisted)
            bodies: dict[int, str] = {}
            for eid in unlisted:
                if eid not in known:
                    new.append(eid)
                    bodies[eid] = listed[eid].model_dump_json()
                    self._db.execute(
                        "INSERT INTO work (execution_id, computer, body, updated_at)"
                        " VALUES (?, ?, ?, ?)",
                        (eid, listed[eid].computer, bodies[eid], now),
                    )
                else:
                    relisted.append(eid)
                    self._db.execute(
                        "UPDATE work SET listed = 1, updated_at = ? WHERE execution_id = ?",
                        (now, eid),
                    )
            gone = [eid for eid in self._listed if eid not in listed]
            self._db.executemany(
                "UPDATE work SET listed = 0, updated_at = ? WHERE execution_id = ?",
                [(now, eid) for eid in gone],
            )
            self._db.execute(
                "DELETE FROM work WHERE listed = 0 AND updated_at < ?", (now - TOMBSTONE_S,)
            )
        for eid in gone:
            self._release(self._listed[eid])
        for eid in new:
            w = listed[eid]
            self._hold(CachedWork(eid, w.computer, w, False, False, False, bodies[eid]))
        for eid in relisted:
            row = self._db.execute("SELECT * FROM work WHERE execution_id = ?", (eid,)).fetchone()
            self._hold(_work(row))
        return new

    def _existing(self, execution_ids: list[int]) -> set[int]:
        """Those of `execution_ids` the table holds (listed or not)."""
        found: set[int] = set()
        for first in range(0, len(execution_ids), _IN_CHUNK):
            ids = execution_ids[first : first + _IN_CHUNK]
            marks = ",".join("?" * len(ids))
            found.update(
                int(r[0])
                for r in self._db.execute(
                    f"SELECT execution_id FROM work WHERE execution_id IN ({marks})",  # noqa: S608
                    ids,
                )
            )
        return found

    def _hold(self, w: CachedWork) -> None:
        """Keep listed work in memory (and among its computer's unfinished, unless done)."""
        self._listed[w.execution_id] = w
        mine = self._unfinished.setdefault(w.computer, {})
        if w.done:
            mine.pop(w.execution_id, None)
        else:
            mine[w.execution_id] = w
        if not mine:
            del self._unfinished[w.computer]

    def _release(self, w: CachedWork) -> None:
        """Work the NS no longer lists: out of memory (its row stays, as a tombstone)."""
        del self._listed[w.execution_id]
        mine = self._unfinished.get(w.computer)
        if mine is not None:
            mine.pop(w.execution_id, None)
            if not mine:
                del self._unfinished[w.computer]

    def pending_work(self, computer: str | None = None) -> list[CachedWork]:
        """Work the NS lists and the agent has not finished (of one computer, or all), in
        execution id order."""
        if computer is not None:
            mine = self._unfinished.get(computer)
            return sorted(mine.values(), key=_execution_id) if mine else []
        return sorted(
            (w for mine in self._unfinished.values() for w in mine.values()), key=_execution_id
        )

    def work_owner(self, execution_id: int) -> str | None:
        """The computer an execution (listed now or recently) belongs to."""
        listed = self._listed.get(execution_id)
        if listed is not None:
            return listed.computer
        row = self._db.execute(
            "SELECT computer FROM work WHERE execution_id = ?", (execution_id,)
        ).fetchone()
        return str(row[0]) if row else None

    def mark(self, flag: str, execution_ids: Iterable[int]) -> None:
        """Set `agent_tickled`, `agent_pulled` or `done` on executions."""
        self.mark_all({flag: execution_ids})

    def mark_all(self, flags: Mapping[str, Iterable[int]], durable: bool = True) -> None:
        """Set each flag (`agent_tickled`, `agent_pulled`, `done`) on its executions, in one
        transaction (`durable=False`: not synced, see `localdb.transaction`, `localdb.WalSync`)."""
        for flag in flags:
            if flag not in ("agent_tickled", "agent_pulled", "done"):
                raise ValueError(f"unknown work flag {flag!r}")
        marks = {flag: [(eid,) for eid in ids] for flag, ids in flags.items()}
        if not any(marks.values()):
            return
        with localdb.transaction(self._db, durable=durable):
            for flag, rows in marks.items():
                self._db.executemany(
                    f"UPDATE work SET {flag} = 1 WHERE execution_id = ?",  # noqa: S608 - checked
                    rows,
                )
        for flag, rows in marks.items():
            self.flag_held(flag, [eid for (eid,) in rows])
            if flag == "done":
                self._drop_cancels(eid for (eid,) in rows)

    def flag_held(self, flag: str, execution_ids: Iterable[int]) -> None:
        """Set `flag` on the work held in memory only: what the next requests read (the row
        follows with `mark_all`)."""
        for eid in execution_ids:
            w = self._listed.get(eid)
            if w is not None and not getattr(w, flag):
                self._hold(_flagged(w, flag))

    # --- cancels ------------------------------------------------------------------------------

    def add_cancels(self, execution_ids: Iterable[int]) -> list[int]:
        """Note the NS's cancels; return those new here (forgotten after `TOMBSTONE_S`)."""
        now = time.time()
        new = sorted(set(execution_ids) - self.cancelled)
        with localdb.transaction(self._db):
            self._db.executemany(
                "INSERT OR IGNORE INTO cancels (execution_id, at) VALUES (?, ?)",
                [(eid, now) for eid in new],
            )
            self._db.execute("DELETE FROM cancels WHERE at < ?", (now - TOMBSTONE_S,))
        self.cancelled = frozenset(
            int(r[0]) for r in self._db.execute("SELECT execution_id FROM cancels")
        )
        self._load_cancels_of()
        return new

    def cancels_for(self, computer: str) -> list[int]:
        """The cancelled executions cached for `computer` that it has not reported finished."""
        return list(self._cancels_of.get(computer, ()))

    def _load_cancels_of(self) -> None:
        """Read which computers have cancelled work they have not finished (after the cancels
        changed; a finish takes its execution out with `_drop_cancels`)."""
        self._cancels_of = {}
        if not self.cancelled:
            return
        rows = self._db.execute(
            "SELECT w.computer, w.execution_id FROM work w JOIN cancels c USING (execution_id)"
            " WHERE w.done = 0 ORDER BY w.execution_id"
        )
        for computer, eid in rows:
            self._cancels_of.setdefault(str(computer), []).append(int(eid))

    def _drop_cancels(self, finished: Iterable[int]) -> None:
        if not self.cancelled:
            return
        gone = set(finished) & self.cancelled
        if not gone:
            return
        for computer, eids in list(self._cancels_of.items()):
            left = [eid for eid in eids if eid not in gone]
            if left:
                self._cancels_of[computer] = left
            else:
                del self._cancels_of[computer]

    def computers_of(self, execution_ids: Iterable[int]) -> list[str]:
        """The computers the executions are cached for."""
        ids = list(execution_ids)
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        rows = self._db.execute(
            f"SELECT DISTINCT computer FROM work WHERE execution_id IN ({marks})",  # noqa: S608
            ids,
        )
        return sorted(str(r[0]) for r in rows)

    # --- settings -----------------------------------------------------------------------------

    def settings(self) -> SettingsOut | None:
        return self._settings

    def save_settings(self, settings: SettingsOut) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO settings (id, body) VALUES (1, ?)",
            (settings.model_dump_json(),),
        )
        self._settings = settings


def _flagged(w: CachedWork, flag: str) -> CachedWork:
    """`w` with `flag` set: made directly (`dataclasses.replace` took ~2 µs more a call, two
    calls an agent's pull and tickle)."""
    tickled, pulled, done = w.agent_tickled, w.agent_pulled, w.done
    if flag == "agent_tickled":
        tickled = True
    elif flag == "agent_pulled":
        pulled = True
    else:
        done = True
    return CachedWork(w.execution_id, w.computer, w.work, tickled, pulled, done, w.json)


def _execution_id(w: CachedWork) -> int:
    return w.execution_id


def _client(row: tuple[object, ...]) -> Client:
    name, token_sha, key, host, port, cem, reported, observed = row
    return Client(
        name=str(name),
        token_sha256=str(token_sha),
        tickle_key=str(key),
        tickle_host=None if host is None else str(host),
        tickle_port=int(str(port)),
        cem=bool(cem),
        reported_address=None if reported is None else str(reported),
        observed_address=None if observed is None else str(observed),
    )


def _work(row: tuple[object, ...]) -> CachedWork:
    eid, computer, body, _listed, tickled, pulled, done, _updated = row
    return CachedWork(
        execution_id=int(str(eid)),
        computer=str(computer),
        work=ExecutionWork.model_validate_json(str(body)),
        agent_tickled=bool(tickled),
        agent_pulled=bool(pulled),
        done=bool(done),
        json=str(body),
    )
