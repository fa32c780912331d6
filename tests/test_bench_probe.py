"""`make bench`'s speed probes (bench/run.py): besides pure Python, the disk's fsync and the
loopback's round trip, so a run on a day whose disk or system calls were slow (S4 halved at the
same pure-Python probe) can be told apart."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

# bench/run.py: a script beside its longpoll.py, not a package
import run as bench


def test_the_fsync_probe_times_a_durable_write_in_the_directory_it_is_given(
    tmp_path: Path,
) -> None:
    ms = bench.fsync_probe_ms(tmp_path, tries=5)
    assert math.isfinite(ms)
    assert ms > 0
    assert list(tmp_path.iterdir()) == [], "the probe's file is removed"


def test_the_udp_probe_times_round_trips_on_loopback() -> None:
    us = bench.udp_probe_us(round_trips=50)
    assert math.isfinite(us)
    assert us > 0


def test_each_probe_is_in_the_head_line_and_the_quickest_in_the_figures() -> None:
    start = bench.Probes(python_ms=180.4, fsync_ms=1.25, udp_us=31.0)
    end = bench.Probes(python_ms=150.2, fsync_ms=2.5, udp_us=12.4)
    line = bench.probes_line(start, end)
    assert "Python 180 / 150 ms" in line
    assert "fsync 1.25 / 2.50 ms" in line
    assert "UDP round trip 31 / 12 µs" in line
    r = bench.Results()
    bench.put_probes(r, start, end)
    assert r.figures["speed_probe_ms"]["value"] == 150.2
    assert r.figures["fsync_probe_ms"]["value"] == 1.25
    assert r.figures["udp_probe_us"]["value"] == 12.4
    assert r.figures["udp_probe_us"]["unit"] == "µs"
