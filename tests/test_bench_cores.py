"""`make bench ARGS=--cores` (bench/run.py): the cores each group of a fleet run's processes kept
busy in each part of the run, from their threads' run time sampled while it ran."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

# bench/run.py: a script beside its longpoll.py, not a package
import run as bench


def test_each_part_of_the_run_shows_the_cores_each_group_kept_busy() -> None:
    # the NS busy on one core for the first second, the task servers on two for the next
    samples = [
        (100.0, {}),
        (100.5, {"NS": 0.5}),
        (101.0, {"NS": 1.0}),
        (101.5, {"NS": 1.0, "task servers": 1.0}),
        (102.0, {"NS": 1.0, "task servers": 2.0, "simulators": 0.25}),
    ]
    rows = bench.busy_cores_rows(samples, 100.0, 2.0, 2)
    assert rows[-2:] == [
        "| 0.00 to 1.00 | 1.00 | 0.00 | 0.00 | 1.00 |",
        "| 1.00 to 2.00 | 0.00 | 2.00 | 0.25 | 2.25 |",
    ]


def test_between_two_samples_the_time_spent_is_shared_evenly() -> None:
    samples = [(10.0, {"NS": 0.0}), (14.0, {"NS": 4.0})]
    rows = bench.busy_cores_rows(samples, 10.0, 4.0, 4)
    assert [r.split(" | ")[1] for r in rows[-4:]] == ["1.00"] * 4


def test_the_processes_group_by_their_names() -> None:
    groups = [bench.core_group(n) for n in ("ns", "ns2", "ts1", "ts4", "sim0", "sim3")]
    assert groups == ["NS", "NS", "task servers", "task servers", "simulators", "simulators"]


def test_a_process_run_time_grows_as_it_computes_and_an_ended_one_has_none() -> None:
    before = bench._run_s(os.getpid())
    assert before is not None
    end = time.process_time() + 0.05
    while time.process_time() < end:  # bounded: 50 ms of this process's CPU
        pass
    after = bench._run_s(os.getpid())
    assert after is not None
    assert after - before >= 0.04
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    assert bench._run_s(ended.pid) is None


async def test_the_sampler_samples_from_the_run_now_until_stopped_and_only_with_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    off = bench._CoreSampler({"sim0": os.getpid()}, restart=False)
    await off.stop()
    assert off.samples == []
    monkeypatch.setattr(bench, "CORES", True)
    on = bench._CoreSampler({"sim0": os.getpid()}, restart=False)
    end = time.process_time() + 0.1
    while time.process_time() < end:  # bounded CPU, then the loop samples once more
        pass
    await on.stop()
    assert len(on.samples) >= 2
    assert on.samples[0][1] == {"simulators": 0.0}
    assert on.samples[-1][1]["simulators"] >= 0.08
    across_restart = bench._CoreSampler({"sim0": os.getpid()}, restart=True)
    await across_restart.stop()
    assert across_restart.samples == []
