"""Results of the fault and attack tests, collected into RELIABILITY.md.

A test calls `record(...)` with what it did and what it measured; each call appends one JSON line
to build/reliability/results.jsonl. `python scripts/reliability_report.py` turns the lines of the
last run into the table in RELIABILITY.md, so the table is the tests' own output.
"""

from __future__ import annotations

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
        "command": command
        or f"pytest -k {os.environ.get('PYTEST_CURRENT_TEST', '').split(' ')[0].split('::')[-1]}",
        "figures": figures,
        "at": time.time(),
    }
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
