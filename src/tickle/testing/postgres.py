"""A private PostgreSQL server in a temporary directory: for the PostgreSQL tests and the bench.

It runs from Debian's binaries (`scripts/sysdeps.sh` installs the `postgresql` package) as the
`postgres` system user when we are root (initdb refuses root), in a directory under that user's
home then (the temporary directory may be closed to it: a private /tmp of mode 0700), listening
only on 127.0.0.1 on a free port with its unix socket in its directory, trusting loopback, without
fsync (a test server: nothing in it must survive a crash). `stop()` ends it and removes its files.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

START_DEADLINE_S = 30.0


class PostgresError(Exception):
    """The server could not be found or started (the message says why)."""


@dataclass
class PgServer:
    """A running private PostgreSQL server."""

    port: int
    root: Path
    process: subprocess.Popen[bytes]

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        """An autocommit connection (close it, or use it as a context manager)."""
        return psycopg.connect(self.url(database, "postgresql"), autocommit=True)

    def create_database(self, name: str) -> str:
        """Create an empty database; return its SQLAlchemy URL."""
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
            preloaded = str(conn.execute("SHOW shared_preload_libraries").fetchone()[0])  # type: ignore[index]
        if "pg_stat_statements" in preloaded:
            with psycopg.connect(self.url(name, "postgresql"), autocommit=True) as conn:
                conn.execute("CREATE EXTENSION pg_stat_statements")
        return self.url(name)

    def statements(self, database: str, top: int = 25) -> list[tuple[object, ...]]:
        """The statements that took the most time in `database` (pg_stat_statements: the server
        started with `statements`, the extension created there by `create_database`): calls,
        total ms, rows, the statement's first 160 characters."""
        with psycopg.connect(self.url(database, "postgresql"), autocommit=True) as conn:
            return conn.execute(
                "SELECT calls, round(total_exec_time::numeric, 1), rows, left(query, 160)"
                " FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT %s",
                (top,),
            ).fetchall()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.root / "postgres.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server (fast shutdown, else SIGKILL) and remove its files."""
        # SIGINT: fast shutdown (disconnect clients, no checkpoint wait worth mentioning)
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(max_connections: int = 300, statements: bool = False) -> PgServer:
    """Start a private server and wait until it accepts connections. `statements`: with
    pg_stat_statements loaded (`PgServer.statements` reads it), for the bench."""
    bindir = _server_bindir()
    prefix, uid, gid, home = _as_postgres()
    root = Path(tempfile.mkdtemp(prefix="tickle-pg-", dir=home))
    root.chmod(0o700)  # whatever the umask: the server must enter it
    process: subprocess.Popen[bytes] | None = None
    try:
        if uid is not None and gid is not None:
            os.chown(root, uid, gid)
        data = root / "data"
        initdb = subprocess.run(
            [*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            capture_output=True, text=True, timeout=120, check=False, cwd=root,
        )  # fmt: skip
        if initdb.returncode != 0:
            raise PostgresError(f"initdb failed ({initdb.returncode}):\n{initdb.stderr}")
        port = _free_port()
        log = (root / "postgres.log").open("ab")
        if uid is not None and gid is not None:
            os.chown(root / "postgres.log", uid, gid)
        # the server in the foreground, as our child: killed with its user, never left behind
        process = subprocess.Popen(
            [*prefix, str(bindir / "postgres"), "-D", str(data), "-p", str(port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root}",
             "-c", f"max_connections={max_connections}", "-c", "fsync=off",
             "-c", "full_page_writes=off",
             *(["-c", "shared_preload_libraries=pg_stat_statements"] if statements else [])],
            stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
        )  # fmt: skip
        log.close()
        server = PgServer(port, root, process)
        _wait_ready(server)
        return server
    except BaseException:
        if process is not None:
            PgServer(0, root, process).stop()
        shutil.rmtree(root, ignore_errors=True)
        raise


def _server_bindir() -> Path:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    if not found:
        raise PostgresError(
            "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb): "
            "run `scripts/sysdeps.sh` as root (`make sysdeps`) to install Debian's postgresql"
        )
    return Path(found[-1]).parent


def _as_postgres() -> tuple[list[str], int | None, int | None, Path | None]:
    """The command prefix that runs a program as the `postgres` user (root only), its ids, and the
    directory to make the server's own in: that user's home when it owns it (every path above is
    open to it there, unlike a temporary directory that may be root's alone), else None (the
    temporary directory)."""
    if os.geteuid() != 0:
        return [], None, None, None
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresError(
            "no `postgres` system user: install Debian's postgresql package"
        ) from None
    prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]
    home = Path(pw.pw_dir)
    try:
        owned = home.is_dir() and home.stat().st_uid == pw.pw_uid
    except OSError:
        owned = False
    return prefix, pw.pw_uid, pw.pw_gid, home if owned else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(server: PgServer) -> None:
    end = time.monotonic() + START_DEADLINE_S
    while True:
        if server.process.poll() is not None:
            raise PostgresError(
                f"PostgreSQL exited with {server.process.returncode} at start:\n"
                + server.log_tail()
            )
        try:
            with server.connect() as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            if time.monotonic() > end:
                raise PostgresError(
                    f"PostgreSQL did not accept connections in {START_DEADLINE_S}s:\n"
                    + server.log_tail()
                ) from None
            time.sleep(0.1)
