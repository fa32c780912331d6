"""Results of the fault and attack tests, collected into RELIABILITY.md.

A test calls `record(...)` with what it did and what it measured; each call appends one JSON line
to build/reliability/results.jsonl. `python scripts/reliability_report.py` turns the lines of the
last run into the table in RELIABILITY.md, so the table is the tests' own output.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "build" / "reliability" / "results.jsonl"


def record(
    case: str,
    done: str,
    outcome: str,
    *,
    sent: int | None = None,
    recorded: int | None = None,
    duplicated: int | None = None,
    tried: int | None = None,
    command: str = "",
    **figures: float | int | str,
) -> None:
    """Append one result row: the case, what was done, the counts, and the outcome."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    row = {
        "case": case,
        "done": done,
        "sent": sent,
        "recorded": recorded,
        "duplicated": duplicated,
        "tried": tried,
        "outcome": outcome,
        "command": command or f"pytest -k {_current_test()}",
        "figures": figures,
        "at": time.time(),
    }
    # one write of the whole line to a file opened for appending, under an exclusive lock: rows
    # of tests running at once (pytest -n N) never interleave
    fd = os.open(RESULTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, (json.dumps(row) + "\n").encode())
    finally:
        os.close(fd)


def _current_test() -> str:
    """The running test's name."""
    return os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0].split("::")[-1]
