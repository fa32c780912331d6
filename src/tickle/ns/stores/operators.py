"""The operator store: named operator accounts (tokens kept as SHA-256) and web console sessions."""

from __future__ import annotations

import time

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from tickle import messages as m
from tickle.ns.credentials import new_token, token_sha256
from tickle.ns.database import Database
from tickle.ns.errors import Conflict
from tickle.ns.models import ConsoleSession, Operator

# the name the admin token acts under (an operator account cannot take it)
ADMIN = "admin"


class OperatorStore:
    """Operator accounts and console sessions in the NS database."""

    def __init__(self, database: Database) -> None:
        self._db = database

    def add(self, body: m.OperatorCreate) -> m.OperatorCredentials:
        """A new operator account with a new token (returned once, stored as its SHA-256)."""
        if body.name == ADMIN:
            raise Conflict(f"{ADMIN!r} is the admin token's name; choose another")
        token = new_token()
        try:
            with self._db.writing() as s:
                if s.scalar(select(Operator.id).where(Operator.name == body.name)) is not None:
                    raise Conflict(f"operator {body.name!r} exists")
                s.add(
                    Operator(
                        name=body.name, token_sha256=token_sha256(token), created_at=time.time()
                    )
                )
        except IntegrityError:
            raise Conflict(f"operator {body.name!r} exists") from None
        return m.OperatorCredentials(name=body.name, token=token)

    def operators(self) -> list[m.OperatorOut]:
        with self._db.reading() as s:
            rows = s.scalars(select(Operator).order_by(Operator.name))
            return [m.OperatorOut(name=o.name, created_at=o.created_at) for o in rows]

    def name_for(self, sha: str) -> str | None:
        """The operator whose token has this SHA-256, if any."""
        with self._db.reading() as s:
            return s.scalar(select(Operator.name).where(Operator.token_sha256 == sha))

    # --- console sessions ----------------------------------------------------------------------

    def open_session(self, who: str, lifetime_s: float) -> str:
        """A new session for `who`: its cookie value (stored as its SHA-256). Expired sessions
        are dropped on the way."""
        token = new_token()
        now = time.time()
        with self._db.writing() as s:
            s.execute(delete(ConsoleSession).where(ConsoleSession.expires_at <= now))
            s.add(
                ConsoleSession(
                    token_sha256=token_sha256(token),
                    who=who,
                    created_at=now,
                    expires_at=now + lifetime_s,
                )
            )
        return token

    def session_who(self, token: str) -> str | None:
        """Who an unexpired session belongs to (None: unknown or expired)."""
        with self._db.reading() as s:
            row = s.scalar(
                select(ConsoleSession).where(ConsoleSession.token_sha256 == token_sha256(token))
            )
            if row is None or row.expires_at <= time.time():
                return None
            return row.who

    def close_session(self, token: str) -> None:
        with self._db.writing() as s:
            s.execute(
                delete(ConsoleSession).where(ConsoleSession.token_sha256 == token_sha256(token))
            )
