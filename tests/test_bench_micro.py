"""`make bench-micro`: each micro-benchmark's CPU per agent, printed and written as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

MICRO = Path(__file__).resolve().parent.parent / "bench" / "micro.py"


def test_the_micro_benchmarks_print_and_write_each_figure(tmp_path: Path) -> None:
    out = tmp_path / "micro.json"
    done = subprocess.run(
        [sys.executable, str(MICRO), "--agents", "40", "--rounds", "2", "--samples", "3",
         "--gap-ms", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    figures = json.loads(out.read_text())["cpu_us_per_agent"]
    assert set(figures) == {"state_reports", "tickle_flights"}
    cold = json.loads(out.read_text())["ns_cold_ms"]
    assert set(cold) == {"run_now", "work_pull"}
    for name, ms in cold.items():
        assert ms > 0
        assert f"ns {name}: {ms:.3f} ms (median of 3, 1 ms idle before each)" in done.stdout
    for name, us in figures.items():
        assert us > 0
        assert f"{name}: {us:.2f} CPU-µs per agent (best of 2 rounds of 40)" in done.stdout


def test_a_bad_agent_count_is_refused_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, str(MICRO), "--agents", "0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "micro.py: error: --agents, --rounds and --samples: at least 1"
    )
    assert "Traceback" not in done.stderr
