"""A component's state directory is private whatever the umask; one others could write is refused."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tickle.config import ConfigError
from tickle.statedir import make_private


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    """Run as a user with the common umask 022 would; the test process gets its umask back."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    found = {".": root.stat().st_mode & 0o777}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = path.lstat().st_mode & 0o777
    return found


def test_new_state_dir_and_the_sqlite_files_made_later_are_private(tmp_path: Path) -> None:
    state = tmp_path / "new" / "ns"
    make_private(state)
    db = sqlite3.connect(state / "ns.db")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (x)")
    (state / "admin-token").write_text("secret\n")

    found = modes(state)
    assert {"ns.db", "ns.db-wal", "ns.db-shm", "admin-token"} <= set(found)
    db.close()
    assert found == {".": 0o700} | {name: 0o600 for name in found if name != "."}


def test_state_left_readable_by_an_earlier_run_is_made_private(tmp_path: Path) -> None:
    state = tmp_path / "ts"
    (state / "sub").mkdir(parents=True)
    for name in ("task-server.db", "task-server.db-wal", "sub/outbox.db"):
        (state / name).write_text("")
    for path in (state, state / "sub"):
        path.chmod(0o755)
    for name in ("task-server.db", "task-server.db-wal", "sub/outbox.db"):
        (state / name).chmod(0o644)
    outside = tmp_path / "elsewhere"
    outside.write_text("")
    outside.chmod(0o644)
    (state / "link").symlink_to(outside)

    make_private(state)

    found = modes(state)
    found.pop("link")
    assert found == {
        ".": 0o700, "sub": 0o700, "task-server.db": 0o600, "task-server.db-wal": 0o600,
        "sub/outbox.db": 0o600,
    }  # fmt: skip
    assert outside.stat().st_mode & 0o777 == 0o644, "a symbolic link was followed"


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o1777])
def test_state_dir_writable_by_others_is_refused_naming_it(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "agent"
    state.mkdir()
    state.chmod(mode)

    with pytest.raises(ConfigError) as exc:
        make_private(state)

    assert str(state) in str(exc.value)
    assert "writable by group or others" in str(exc.value)
    assert state.stat().st_mode & 0o7777 == mode, "a refused directory is left as it was"


def test_state_dir_or_file_of_another_user_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = tmp_path / "ns"
    state.mkdir(mode=0o700)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(state).st_uid + 1)
    with pytest.raises(ConfigError, match=f"{state} belongs to uid"):
        make_private(state)

    monkeypatch.undo()
    if os.geteuid() != 0:
        pytest.skip("only root can give a file to another user")
    planted = state / "ns.db"
    planted.write_text("")
    os.chown(planted, 65534, 65534)
    with pytest.raises(ConfigError, match=f"{planted} belongs to uid 65534"):
        make_private(state)


def test_a_state_dir_that_cannot_be_made_is_one_message_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=f"cannot use {blocker / 'ns'}"):
        make_private(blocker / "ns")


def test_a_state_dir_reached_through_a_symbolic_link_is_made_private(tmp_path: Path) -> None:
    # systemd's StateDirectory= can be a link (DynamicUser=): the directory it leads to counts
    real = tmp_path / "private" / "ns"
    real.mkdir(parents=True)
    real.chmod(0o755)
    (real / "ns.db").write_text("")
    (real / "ns.db").chmod(0o644)
    link = tmp_path / "ns"
    link.symlink_to(real)

    make_private(link)

    assert modes(real) == {".": 0o700, "ns.db": 0o600}
