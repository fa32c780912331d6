"""The private PostgreSQL server the tests and the bench start (tickle.testing.postgres)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tickle.testing.postgres import start_postgres

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture
def private_tmp(tmp_path: Path) -> Iterator[Path]:
    """A temporary directory root alone may enter (mode 0700), as a CI sandbox's /tmp may be."""
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    saved = tempfile.tempdir
    tempfile.tempdir = str(closed)
    try:
        yield closed
    finally:
        tempfile.tempdir = saved


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs the server as another user")
def test_server_starts_when_the_temporary_directory_is_closed_to_the_postgres_user(
    private_tmp: Path,
) -> None:
    server = start_postgres(max_connections=10)
    try:
        assert not server.root.is_relative_to(private_tmp)
        with server.connect() as conn:
            row = conn.execute("SELECT current_user").fetchone()
        assert row == ("postgres",)
    finally:
        server.stop()
    assert not server.root.exists()
