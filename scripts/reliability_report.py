"""Turns the fault and attack tests' results (build/reliability/) into RELIABILITY.md."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "build" / "reliability" / "results.jsonl"
REPORT = ROOT / "RELIABILITY.md"

HEADER = """# Reliability: faults and attacks

Produced by the tests themselves: each fault and attack test appends its figures to
`build/reliability/results.jsonl`, and `make reliability` runs them and rewrites this file.
Reproduce one row with the command in its last column.

| case | what was done | sent | recorded | duplicated | tried | outcome | figures | command |
|---|---|---|---|---|---|---|---|---|
"""


def main() -> int:
    if not RESULTS.exists():
        print(f"no results at {RESULTS}: run the fault and attack tests first", file=sys.stderr)
        return 1
    rows: dict[str, dict[str, object]] = {}
    for line in RESULTS.read_text().splitlines():
        row = json.loads(line)
        rows[row["case"]] = row  # the last run of each case wins
    lines = [HEADER.rstrip("\n")]
    for row in sorted(rows.values(), key=lambda r: str(r["case"])):
        figures = ", ".join(f"{k} {v}" for k, v in dict(row.get("figures") or {}).items())  # type: ignore[call-overload]
        cells = [
            row["case"],
            row["done"],
            row["sent"],
            row["recorded"],
            row["duplicated"],
            row["tried"],
            row["outcome"],
            figures,
            f"`{row['command']}`",
        ]
        lines.append(
            "| " + " | ".join("-" if c is None or c == "" else str(c) for c in cells) + " |"
        )
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    REPORT.write_text("\n".join(lines) + f"\n\nLast written {stamp}.\n")
    print(REPORT.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
