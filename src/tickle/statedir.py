"""A component's state directory: private to the user that runs the component, whatever the umask.

Every component keeps secrets there: the NS its links' tickle keys and the admin token, a task
server its NS bearer token and tickle key, an agent its token and tickle key. They live in SQLite
files whose `-wal` and `-shm` siblings SQLite creates later, with the database file's mode. So
`make_private` runs once at start, before anything is opened or bound: it sets the process umask,
so that everything created from then on is 0700 / 0600, refuses a directory others could have
written to, and takes group and other access away from what an earlier run left behind.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from tickle.settingsbase import ConfigError

log = logging.getLogger(__name__)

# new files 0600, new directories 0700: SQLite's -wal/-shm, sockets and secrets alike
PRIVATE_UMASK = 0o077


def make_private(path: Path) -> None:
    """Create `path` (0700), or make it and everything in it private (0700 / 0600).

    Raises ConfigError naming the path when the directory, or something in it, belongs to
    another user, or when the directory is writable by group or others: its files may have been
    planted or swapped, so starting would trust them.
    """
    os.umask(PRIVATE_UMASK)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = _check(path, path.stat())
        if mode & 0o022:
            raise ConfigError(
                f"setting state_dir: {path} is writable by group or others (mode {mode:04o}):"
                f" check what is in it, then chmod 700 {path}"
            )
        tightened = [p for p in _tree(path) if _tighten(p)]
    except OSError as exc:
        raise ConfigError(f"setting state_dir: cannot use {path}: {exc}") from None
    if tightened:
        log.warning(
            "state_dir %s: took group and other access away from %d path(s): %s",
            path, len(tightened), ", ".join(str(p) for p in tightened[:5]),
        )  # fmt: skip


def _tree(path: Path) -> list[Path]:
    """`path` and everything below it, symbolic links below it left out (never followed)."""
    below = [Path(root, name) for root, dirs, files in os.walk(path) for name in (*dirs, *files)]
    return [path, *(p for p in below if not p.is_symlink())]


def _tighten(path: Path) -> bool:
    """Remove group and other access from `path`; whether it had any."""
    mode = _check(path, path.lstat())
    if not mode & 0o077:
        return False
    path.chmod(mode & 0o700)
    return True


def _check(path: Path, st: os.stat_result) -> int:
    """The permission bits of `path`; ConfigError when another user owns it."""
    uid = os.geteuid()
    if st.st_uid != uid:
        raise ConfigError(
            f"setting state_dir: {path} belongs to uid {st.st_uid}, not to uid {uid} that runs"
            f" this component: chown it, or use another state_dir"
        )
    return stat.S_IMODE(st.st_mode)
