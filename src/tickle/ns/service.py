"""Run the notification server: migrate the database, start the tickle server, serve the API."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

import uvicorn
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from tickle.config import ConfigError, check_config, load_settings
from tickle.logs import setup_logging
from tickle.metrics import ComponentMetrics
from tickle.ns.api import create_app
from tickle.ns.settings import NsSettings
from tickle.ns.stores import Stores
from tickle.ns.tickle_server import TickleServer
from tickle.serving import ServingConfig, run_server
from tickle.statedir import make_private

log = logging.getLogger("tickle.ns")


def main(args: list[str]) -> int:
    """`tickle ns [flags]`: returns 0 after a clean stop (SIGTERM/SIGINT), 2 on bad config."""
    checked = check_config("ns", NsSettings, args)
    if checked is not None:
        return checked
    try:
        settings = load_settings(NsSettings, args)
    except ConfigError as exc:
        print(f"tickle ns: {exc}", file=sys.stderr)
        return 2
    setup_logging("ns", settings.log_level, settings.log_format)
    try:
        make_private(settings.state_dir)
        settings = settings.with_secrets()
    except ConfigError as exc:
        print(f"tickle ns: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"tickle ns: setting state_dir: cannot use {settings.state_dir}: {exc}", file=sys.stderr
        )
        return 2
    try:
        return run_server(serve(settings))
    except SQLAlchemyError as exc:
        # a database that cannot be opened or migrated: say which, without a traceback
        print(f"tickle ns: {_database_error(settings.db_url, exc)}", file=sys.stderr)
        return 1


def _database_error(url: str, exc: SQLAlchemyError) -> str:
    """`database URL: reason`: the URL with its password masked, and the driver's own first line
    (`connection refused`) without SQLAlchemy's wrapping (no statement, parameters or link)."""
    cause = getattr(exc, "orig", None) or exc
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    reason = (lines[0] if lines else type(cause).__name__).removesuffix(".")
    try:
        parsed = make_url(url)
    except ArgumentError:
        return f"database (unparsable URL): {reason}"
    if parsed.password:
        reason = reason.replace(str(parsed.password), "***")
    return f"database {parsed.render_as_string(hide_password=True)}: {reason}"


async def serve(settings: NsSettings, stop: asyncio.Event | None = None) -> int:
    """Run the NS until SIGTERM/SIGINT (or `stop` is set); returns the exit code.

    `settings` carries its secrets (`NsSettings.with_secrets`, as `main` reads them)."""
    stores = Stores.open(settings.db_url)
    try:
        await asyncio.to_thread(stores.database.migrate)
        metrics = ComponentMetrics("ns")
        tickle_server = TickleServer(settings, stores, metrics)
        app = create_app(settings, stores, tickle_server, metrics)
        server = uvicorn.Server(
            ServingConfig(
                app,
                settings,
                metrics,
                host=settings.api_host,
                port=settings.api_port,
                ssl_certfile=settings.tls_cert_file,
                ssl_keyfile=settings.tls_key_file,
                log_config=None,
                lifespan="on",
                access_log=False,
            )
        )
        restore = _on_signals(server)
        await tickle_server.start()
        watcher = asyncio.create_task(_stop_when(stop, server)) if stop is not None else None
        try:
            log.info(
                "notification server on %s://%s:%d (admin token %s, database %s)",
                "https" if settings.tls_cert_file else "http",
                settings.api_host,
                settings.api_port,
                _token_source(settings),
                stores.database.engine.url.render_as_string(hide_password=True),
            )
            await server.serve()
        finally:
            if watcher is not None:
                watcher.cancel()
            await tickle_server.close()
            restore()
        return 0 if server.started else 1
    finally:
        stores.close()


def _on_signals(server: uvicorn.Server) -> Callable[[], None]:
    """Stop on SIGTERM/SIGINT; returns a function restoring the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    # uvicorn replaces these while it serves, restores them after and re-raises what it caught:
    # a handler of our own makes that re-raise harmless instead of killing the process (rc != 0)
    def handle(_sig: int, _frame: FrameType | None) -> None:
        server.should_exit = True

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore


async def _stop_when(stop: asyncio.Event, server: uvicorn.Server) -> None:
    await stop.wait()
    server.should_exit = True


def _token_source(settings: NsSettings) -> str:
    """Where the operators' token came from, for the start-up line (never the token itself)."""
    path = settings.admin_token_file
    try:
        if path.read_text().strip() == settings.admin_token:
            return f"in {path}"
    except OSError:
        pass
    return "from the configuration"
