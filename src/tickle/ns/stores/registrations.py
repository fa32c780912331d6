"""Who may register: stable identities and the operator's approval of new names.

A computer or task server keeps the identity its agent (or task server) first registered with: a
secret that peer made once and keeps, of which the NS stores the SHA-256. A registration under a
registered name with another identity is refused (409), and the registered one keeps being
served, until an operator re-keys the name (`rekey`: the next registration's identity is kept).

With registration_approval = manual, a registration under a new name gets no credentials: it
waits in `registrations` (403) until an operator approves it; a rejected one stays refused.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import ColumnElement, bindparam, delete, select
from sqlalchemy.orm import Session

from tickle import messages as m
from tickle.ns.database import Database
from tickle.ns.errors import Conflict, Forbidden, NotFound
from tickle.ns.models import Computer, Registration, TaskServer

log = logging.getLogger(__name__)

# how the operator's command names each kind, for the refusals that tell what to do
_COMMAND = {"computer": "tickle computers", "task_server": "tickle task-servers"}
_WHAT = {"computer": "computer", "task_server": "task server"}
_PEER = {"computer": "agent", "task_server": "task server"}


class Registered(Protocol):
    """A registered computer or task server, as `admit` reads it."""

    identity_sha256: str | None


@dataclass(frozen=True, slots=True)
class Request:
    """A registration as `admit` judges it."""

    kind: m.RegistrationKind
    name: str
    identity: str | None
    task_server: str | None  # the task server an agent registered through
    address: str | None

    @property
    def identity_sha256(self) -> str | None:
        return identity_sha256(self.identity)


def identity_sha256(identity: str | None) -> str | None:
    """The stored form of an identity."""
    return hashlib.sha256(identity.encode()).hexdigest() if identity else None


_BY_NAME = (Registration.kind == bindparam("kind"), Registration.name == bindparam("name"))
_REQUEST = select(Registration).where(*_BY_NAME)
_FORGET_REQUEST = delete(Registration).where(*_BY_NAME)


def admit(
    s: Session, ask: Request, registered: Registered | None, manual: bool
) -> Conflict | Forbidden | None:
    """None when `ask` may register now; else the refusal to raise once `s` is committed.

    `registered`: the computer or task server of that name, if any. Notes a new request (while
    `manual`) and when a waiting one asked again in `s`.
    """
    what, cmd, sha = _WHAT[ask.kind], _COMMAND[ask.kind], ask.identity_sha256
    if registered is not None:
        if registered.identity_sha256 is not None and registered.identity_sha256 != sha:
            return Conflict(
                f"{what} {ask.name} is registered to another {_PEER[ask.kind]} (a different "
                f"identity): refused; `{cmd} rekey {ask.name}` lets a new one take the name"
            )
        # statements built once, kind and name bound (on every registration)
        s.execute(_FORGET_REQUEST, {"kind": ask.kind, "name": ask.name})
        return None
    r = s.scalar(_REQUEST, {"kind": ask.kind, "name": ask.name})
    now = time.time()
    if r is not None and r.identity_sha256 != sha:
        return Conflict(
            f"another {_PEER[ask.kind]} (a different identity) asked first to register as {what} "
            f"{ask.name}: refused; `{cmd} rekey {ask.name}` forgets that request"
        )
    if r is not None and r.state == "rejected":  # an operator's decision, whatever the mode
        r.last_seen_at = now
        return Forbidden(f"{what} {ask.name} was rejected by an operator")
    if (r is not None and r.state == "approved") or not manual:
        if r is not None:
            s.delete(r)
        return None
    if r is None:
        r = Registration(kind=ask.kind, name=ask.name, identity_sha256=sha, state="pending",
                         requested_at=now)  # fmt: skip
        s.add(r)
        # once per new name: the operator learns of it in the NS's log too
        through = f" through task server {ask.task_server}" if ask.task_server else ""
        log.warning("%s %s asks to register%s (from %s): waiting for approval (`%s approve %s`)",
                    what, ask.name, through, ask.address or "?", cmd, ask.name)  # fmt: skip
    r.last_seen_at = now
    r.task_server, r.address = ask.task_server, ask.address
    return Forbidden(
        f"{what} {ask.name} awaits an operator's approval (`{cmd} approve {ask.name}`)"
    )


class RegistrationStore:
    """The operator's side: registrations awaiting a decision, approve, reject, re-key."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def registrations(self, kind: m.RegistrationKind | None = None) -> list[m.RegistrationOut]:
        """Pending, approved (not registered again yet) and rejected registrations, oldest first."""
        query = select(Registration).order_by(Registration.requested_at, Registration.id)
        if kind is not None:
            query = query.where(Registration.kind == kind)
        with self._db.reading() as s:
            return [_out(r) for r in s.scalars(query)]

    def decide(
        self, kind: m.RegistrationKind, name: str, state: m.RegistrationState
    ) -> m.RegistrationOut:
        """Approve or reject the registration of `name`; NotFound when there is none."""
        with self._db.writing() as s:
            r = s.scalar(select(Registration).where(*_named(kind, name)))
            if r is None:
                raise NotFound(
                    f"no registration of {_WHAT[kind]} {name} awaits a decision "
                    f"(`{_COMMAND[kind]} pending` lists them)"
                )
            r.state, r.decided_at = state, time.time()
            return _out(r)

    def rekey(self, kind: m.RegistrationKind, name: str) -> m.Rekeyed:
        """Let the next registration under `name` bring a new identity (and forget a request
        waiting under that name); NotFound when the name is unknown."""
        with self._db.writing() as s:
            found: Registered | None = (
                s.scalar(select(Computer).where(Computer.name == name))
                if kind == "computer"
                else s.scalar(select(TaskServer).where(TaskServer.name == name))
            )
            waiting = s.scalar(select(Registration).where(*_named(kind, name)))
            if found is None and waiting is None:
                raise NotFound(f"{_WHAT[kind]} {name} is not registered and has not asked to")
            if found is not None:
                found.identity_sha256 = None
            if waiting is not None:
                s.delete(waiting)
        return m.Rekeyed(kind=kind, name=name)


def _named(kind: str, name: str) -> tuple[ColumnElement[bool], ColumnElement[bool]]:
    return (Registration.kind == kind, Registration.name == name)


def _out(r: Registration) -> m.RegistrationOut:
    return m.RegistrationOut(
        kind=r.kind,
        name=r.name,
        state=r.state,
        identity=r.identity_sha256[:16] if r.identity_sha256 else None,
        task_server=r.task_server,
        address=r.address,
        requested_at=r.requested_at,
        last_seen_at=r.last_seen_at,
        decided_at=r.decided_at,
    )
