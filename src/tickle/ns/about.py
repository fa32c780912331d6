"""What a running notification server is (`GET /api/about`): its version, which database it
really uses, the schema revision stamped there, and whether it is the tickle dispatcher."""

from __future__ import annotations

from importlib import metadata
from typing import Literal, cast

from sqlalchemy.engine import URL, make_url

from tickle import messages as m
from tickle.ns.database import Database

_DEFAULT_PORTS = {"postgresql": 5432}


def about(database: Database, dispatcher_active: bool, started_at: float) -> m.About:
    """The about body; reads the schema revision, so call it off the event loop."""
    return m.About(
        version=package_version(),
        database=cast(Literal["sqlite", "postgresql"], database.dialect),
        database_location=database_location(database.engine.url),
        schema_revision=database.schema_revision(),
        dispatcher_active=dispatcher_active,
        started_at=started_at,
    )


def database_location(url: str | URL) -> str:
    """Where the database is, without credentials: the SQLite file, or `host:port/dbname`."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed.database or ":memory:"
    # a unix-socket URL names its directory in the query (`?host=/run/postgresql`)
    host = parsed.host or _query_value(parsed, "host") or "localhost"
    port = parsed.port or _query_value(parsed, "port") or _DEFAULT_PORTS.get(backend, "")
    return f"{host}:{port}/{parsed.database or ''}"


def package_version() -> str:
    """The installed tickle distribution's version ("unknown" when not installed)."""
    try:
        return metadata.version("tickle")
    except metadata.PackageNotFoundError:
        return "unknown"


def _query_value(url: URL, key: str) -> str | None:
    value = url.query.get(key)
    if isinstance(value, tuple):
        return value[0] if value else None
    return value
