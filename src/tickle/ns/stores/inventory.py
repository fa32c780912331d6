"""The inventory store: task servers and computers — their credentials, where to tickle them and
what their task servers see of them."""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ARRAY, String, any_, bindparam, cast, func, insert, select, update
from sqlalchemy.orm import Session

from tickle import messages as m
from tickle.ns import views
from tickle.ns.credentials import Caller, CallerCache, new_tickle_key, new_token, token_sha256
from tickle.ns.database import Database, retry_on_conflict
from tickle.ns.errors import Conflict, Forbidden
from tickle.ns.liveness import DEFAULT_BOUND, OfflineBound
from tickle.ns.models import Base, Computer, Settings, TaskServer
from tickle.ns.stores import bulk, registrations

_COMPUTERS = Base.metadata.tables[Computer.__tablename__]
_NAMES = ARRAY(String)
# what an agent's registration reads of the computer of its name
_ENROLL_COLUMNS = [
    _COMPUTERS.c[name] for name in ("id", "task_server_id", "identity_sha256", "forgotten_at")
]
_ENROLLED = select(*_ENROLL_COLUMNS).where(_COMPUTERS.c.name == bindparam("name"))
_INSERT_COMPUTER = insert(_COMPUTERS)
_UPDATE_COMPUTER = update(_COMPUTERS).where(_COMPUTERS.c.id == bindparam("_id"))


@dataclass(frozen=True, slots=True)
class TaskServerLink:
    """What the tickle server needs to tickle a task server and to see its pulls."""

    name: str
    addr: tuple[str, int]
    key: bytes
    tickle_pulled_at: float | None  # the last work pull a tickle caused
    settings_pulled_at: float | None  # the last settings pull a tickle caused
    tickle_state: str = "unknown"  # whether tickles get through (set_task_server_state)


@dataclass(frozen=True, slots=True)
class Enrollment:
    """An agent's registration through a task server, as the store judges it."""

    task_server: Caller
    registration: m.AgentRegistration
    manual: bool = False  # registration_approval = manual: a new name waits for an operator


# an agent's registration refused (see registrations.admit)
Refusal = Conflict | Forbidden


@dataclass(frozen=True, slots=True)
class Enrolled:
    """An agent's registration: its credentials, and whether its computer moved here from
    another task server (its unfinished work may now be for this one)."""

    credentials: m.AgentCredentials
    moved: bool


class InventoryStore:
    """Task servers and computers in the NS database."""

    def __init__(self, database: Database, callers: CallerCache | None = None) -> None:
        self._db = database
        self.callers = callers or CallerCache()  # task servers' tokens this process looked up

    def caller_for(self, sha: str) -> Caller | None:
        """The task server (or agent) whose token hashes to `sha`."""
        cached = self.callers.get(sha)
        if cached is not None:
            return cached
        with self._db.reading() as s:
            row = s.execute(
                select(TaskServer.id, TaskServer.name).where(TaskServer.token_sha256 == sha)
            ).first()
            if row is not None:
                caller = Caller("task_server", row.name, row.id)
                self.callers.put(sha, caller)
                return caller
            crow = s.execute(
                select(Computer.id, Computer.name).where(
                    Computer.token_sha256 == sha, Computer.forgotten_at.is_(None)
                )
            ).first()
            if crow is not None:
                return Caller("computer", crow.name, crow.id)
        return None

    def register_task_server(
        self, reg: m.TaskServerRegister, ns_id: str, manual: bool = False
    ) -> m.TaskServerCredentials:
        """Create the task server, or rotate its credentials if the name exists.

        Raises Conflict for another identity under a registered name, Forbidden while a new name
        waits for an operator (`manual`) or was rejected (see `registrations.admit`).
        """
        try:
            return retry_on_conflict(lambda: self._register_task_server(reg, ns_id, manual))
        finally:
            self.callers.clear()  # a re-registration rotated the name's token: the old one ends

    def register_agent(
        self, ts: Caller, reg: m.AgentRegistration, manual: bool = False
    ) -> m.AgentCredentials:
        """Create the computer, or move it to this task server and rotate its credentials.

        Refused as `register_task_server` is.
        """
        return self.enroll_agent(ts, reg, manual).credentials

    def enroll_agent(self, ts: Caller, reg: m.AgentRegistration, manual: bool = False) -> Enrolled:
        """`register_agent`, saying too whether the computer moved from another task server."""
        (outcome,) = self.enroll_agents([Enrollment(ts, reg, manual)])
        if isinstance(outcome, Enrolled):
            return outcome
        raise outcome

    def enroll_agents(self, asks: Sequence[Enrollment]) -> list[Enrolled | Refusal]:
        """Several agents' registrations in one write transaction (one commit), in their order:
        each is judged and answered as if it came alone, after the ones before it (two under one
        name: the second sees the first registered). A refusal is returned, not raised: what
        `registrations.admit` noted for it (a pending request) is committed with the others."""
        return retry_on_conflict(lambda: self._enroll_agents(asks))

    def clients(self, ts: Caller) -> list[m.ClientInfo]:
        """The task server's clients, with what it needs to authenticate and tickle them."""
        with self._db.reading() as s:
            rows = s.scalars(
                select(Computer).where(Computer.task_server_id == ts.id).order_by(Computer.name)
            ).all()
            return [views.client_info(c) for c in rows]

    def task_servers(self) -> list[m.TaskServerOut]:
        with self._db.reading() as s:
            rows = s.execute(
                select(Computer.task_server_id, func.count()).group_by(Computer.task_server_id)
            )
            counts: dict[int | None, int] = {row[0]: row[1] for row in rows}
            return [
                views.task_server_out(t, counts.get(t.id, 0))
                for t in s.scalars(select(TaskServer).order_by(TaskServer.name))
            ]

    def computers(
        self, bound: OfflineBound = DEFAULT_BOUND, liveness: m.Liveness | None = None
    ) -> list[m.ComputerOut]:
        """The computers (not forgotten), each online or offline under `bound`; `liveness`:
        only those in that state."""
        with self._db.reading() as s:
            since = bound.online_since(_interval_s(s))
            found = [
                views.computer_out(c, since)
                for c in s.scalars(
                    select(Computer).where(Computer.forgotten_at.is_(None)).order_by(Computer.name)
                )
            ]
        return [c for c in found if liveness is None or c.liveness == liveness]

    def liveness_counts(self, bound: OfflineBound) -> dict[m.Liveness, int]:
        """How many computers (not forgotten) are online and offline: one count query."""
        with self._db.reading() as s:
            since = bound.online_since(_interval_s(s))
            online = Computer.last_contact_at >= since
            total, up = s.execute(
                select(func.count(), func.count().filter(online)).where(
                    Computer.forgotten_at.is_(None)
                )
            ).one()
        return {"online": int(up), "offline": int(total) - int(up)}

    def update_computer_states(self, ts: Caller, states: Sequence[m.ComputerState]) -> list[str]:
        """Apply what a task server saw of its clients (last contact, settings version, tickle
        reachability, observed address); returns the names the NS does not know (forgotten):
        the task server drops their credentials.

        The other clients' states are applied even when the batch names a computer of another
        task server; that refusal is raised after the commit."""
        names = {st.name for st in states}
        with self._db.writing() as s:
            postgresql = s.get_bind().dialect.name == "postgresql"
            # the columns it needs, and one UPDATE per set of columns: a batch of 1,000 contacts
            # must not load (and flush) 1,000 ORM rows; on PostgreSQL the names go as one array
            # and the rows as one JSON document (`bulk`), not thousands of placeholders
            among = (
                Computer.name == any_(cast(bindparam("names", sorted(names), type_=_NAMES), _NAMES))
                if postgresql
                else Computer.name.in_(names)
            )
            found = {
                row.name: row
                for row in s.execute(
                    select(
                        Computer.id, Computer.name, Computer.task_server_id, Computer.cem,
                        Computer.reported_address, Computer.last_contact_at,
                    ).where(among, Computer.forgotten_at.is_(None))
                )
            }  # fmt: skip
            unknown = sorted(names - found.keys())
            foreign = sorted(n for n, c in found.items() if c.task_server_id != ts.id)
            changes: dict[str, dict[str, Any]] = {}
            for st in sorted(states, key=lambda st: st.at):
                c = found.get(st.name)
                if c is None or c.task_server_id != ts.id:
                    continue
                change = changes.setdefault(c.name, {"id": c.id})
                if st.tickle_state is not None and not (c.cem and st.tickle_state != "cem"):
                    change["tickle_state"] = st.tickle_state
                if st.observed_address is not None:
                    change["observed_address"] = st.observed_address
                    change["nat_detected"] = _nat(c.reported_address, st.observed_address)
                if st.clock_offset_s is not None:
                    change["clock_offset_s"] = st.clock_offset_s
                if st.settings_version is not None:
                    change["settings_version"] = st.settings_version
                if st.contact_at is not None:
                    change["last_contact_at"] = max(
                        change.get("last_contact_at") or c.last_contact_at or 0.0, st.contact_at
                    )
            # rows alike in their columns go in one executemany each
            by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for change in changes.values():
                by_columns.setdefault(tuple(sorted(change)), []).append(change)
            for columns, rows in by_columns.items():
                if len(columns) == 1:  # only the id: nothing to set
                    continue
                if postgresql:
                    varying = [c for c in columns if c != "id"]
                    s.execute(bulk.update(_COMPUTERS, "id", varying), {"rows": bulk.rows(rows)})
                else:  # one UPDATE executed for the many rows
                    s.execute(update(Computer), rows)
        if foreign:
            raise Forbidden(f"computer(s) {', '.join(foreign)} not a client of {ts.name!r}")
        return unknown

    # --- the tickle server's view --------------------------------------------------------------

    def pulls_caused(self, task_server: str) -> tuple[float | None, float | None]:
        """When the task server last pulled because of a tickle: its work, its settings
        (`TaskServerLink`'s two; (None, None) for a name not registered)."""
        with self._db.reading() as s:
            row = s.execute(
                select(TaskServer.tickle_pulled_at, TaskServer.settings_pulled_at).where(
                    TaskServer.name == task_server
                )
            ).first()
        return (None, None) if row is None else (row[0], row[1])

    def task_server_links(self) -> list[TaskServerLink]:
        with self._db.reading() as s:
            return [
                TaskServerLink(
                    name=t.name,
                    addr=(t.tickle_host, t.tickle_port),
                    key=base64.b64decode(t.tickle_key),
                    tickle_pulled_at=t.tickle_pulled_at,
                    settings_pulled_at=t.settings_pulled_at,
                    tickle_state=t.tickle_state,
                )
                for t in s.scalars(select(TaskServer))
            ]

    def set_task_server_state(self, name: str, state: str) -> None:
        """Whether tickles get through to the task server (reachable or unreachable)."""
        with self._db.writing() as s:
            s.execute(update(TaskServer).where(TaskServer.name == name).values(tickle_state=state))

    # --- clocks --------------------------------------------------------------------------------

    def set_task_server_clock(self, name: str, offset_s: float, state: str | None) -> None:
        """How far the task server's clock is ahead of ours; `state`: its new tickle state."""
        values: dict[str, object] = {"clock_offset_s": offset_s}
        if state is not None:
            values["tickle_state"] = state
        with self._db.writing() as s:
            s.execute(update(TaskServer).where(TaskServer.name == name).values(**values))

    def task_server_clock(self, name: str) -> float | None:
        """How far the task server's clock is ahead of ours, as last measured (None: unknown)."""
        with self._db.reading() as s:
            offset: float | None = s.scalar(
                select(TaskServer.clock_offset_s).where(TaskServer.name == name)
            )
            return offset

    def clock_figures(self) -> tuple[dict[str, float], int]:
        """Every measured task server's clock offset, and how many computers are clock-skewed."""
        with self._db.reading() as s:
            offsets = {
                row.name: row.clock_offset_s
                for row in s.execute(
                    select(TaskServer.name, TaskServer.clock_offset_s).where(
                        TaskServer.clock_offset_s.is_not(None)
                    )
                )
            }
            skewed = s.scalar(select(func.count()).where(Computer.tickle_state == "clock_skewed"))
            return offsets, int(skewed or 0)

    # --- helpers -------------------------------------------------------------------------------

    def _register_task_server(
        self, reg: m.TaskServerRegister, ns_id: str, manual: bool
    ) -> m.TaskServerCredentials:
        token, key = new_token(), new_tickle_key()
        ask = registrations.Request("task_server", reg.name, reg.identity, None, reg.tickle_host)
        with self._db.writing() as s:
            ts = s.scalar(select(TaskServer).where(TaskServer.name == reg.name))
            # a refusal is raised after the commit: what admit noted (a pending request) is kept
            refusal = registrations.admit(s, ask, ts, manual)
            if refusal is None:
                if ts is None:
                    ts = TaskServer(
                        name=reg.name, registered_at=time.time(), tickle_state="unknown"
                    )
                    s.add(ts)
                ts.token_sha256 = token_sha256(token)
                ts.tickle_key = key
                ts.tickle_host = reg.tickle_host
                ts.tickle_port = reg.tickle_port
                ts.api_url = reg.api_url
                ts.identity_sha256 = ask.identity_sha256 or ts.identity_sha256
        if refusal is not None:
            raise refusal
        return m.TaskServerCredentials(name=reg.name, token=token, tickle_key=key, ns_id=ns_id)

    def _enroll_agents(self, asks: Sequence[Enrollment]) -> list[Enrolled | Refusal]:
        # SQLAlchemy Core: no ORM Computer (with its task server joined) loaded and flushed
        with self._db.writing() as s:
            return [self._enroll_agent(s, ask) for ask in asks]

    def _enroll_agent(self, s: Session, ask: Enrollment) -> Enrolled | Refusal:
        ts, reg = ask.task_server, ask.registration
        token, key = new_token(), new_tickle_key()
        address = reg.observed_address or reg.reported_address
        request = registrations.Request("computer", reg.name, reg.identity, ts.name, address)
        conn = s.connection()
        c = conn.execute(_ENROLLED, {"name": reg.name}).first()
        # a forgotten computer registers as a new one: its old identity went with it
        known = c if c is not None and c.forgotten_at is None else None
        refusal = registrations.admit(s, request, known, ask.manual)
        if refusal is not None:
            return refusal
        values: dict[str, Any] = {
            "task_server_id": ts.id,
            "token_sha256": token_sha256(token),
            "tickle_key": key,
            "tickle_host": reg.tickle_host,
            "tickle_port": reg.tickle_port,
            "cem": reg.cem,
            "groups": list(reg.groups),
            "reported_address": reg.reported_address,
            "observed_address": reg.observed_address,
            "nat_detected": _nat(reg.reported_address, reg.observed_address),
            "tickle_state": "cem" if reg.cem else "unknown",
            "last_contact_at": time.time(),
            "identity_sha256": request.identity_sha256
            or (known.identity_sha256 if known is not None else None),
        }
        # statements built once, the values bound: building one with its values cost more than
        # running it
        if c is None:
            conn.execute(_INSERT_COMPUTER, values | {"name": reg.name})
        else:
            if c.forgotten_at is not None:
                values |= {"forgotten_at": None, "settings_version": None}
            conn.execute(_UPDATE_COMPUTER, values | {"_id": c.id})
        moved = c is not None and c.task_server_id not in (None, ts.id)
        return Enrolled(m.AgentCredentials(name=reg.name, token=token, tickle_key=key), moved)


def _interval_s(s: Session) -> float:
    row = s.get(Settings, 1)
    return float(row.task_request_interval_s if row is not None else 1800)


def _nat(reported: str | None, observed: str | None) -> bool:
    return bool(reported and observed and reported != observed)
