"""How `make bench` reads S8's curve (bench/run.py): each size's figure is its median run of
the rounds, and the simulated agents run in the same number of processes at every size."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

# bench/run.py: a script beside its longpoll.py, not a package
import run as bench


def fleet(wall_s: float | None) -> bench.FleetRun:
    return bench.FleetRun(
        agents=1000,
        register_s=1.0,
        accepted_ms=10.0,
        wall_s=wall_s,
        done=1000,
        executions=[],
        ts_metrics={},
        requests_per_tenth=Counter(),
    )


def test_a_size_counts_its_median_run_not_its_first_or_quickest() -> None:
    runs = [fleet(0.52), fleet(0.41), fleet(0.47)]
    assert bench.median_run(runs) is runs[2]


def test_of_an_even_count_of_runs_the_quicker_middle_one_counts() -> None:
    runs = [fleet(4.0), fleet(1.0), fleet(3.0), fleet(2.0)]
    assert bench.median_run(runs).wall_s == 2.0


def test_a_run_that_never_recorded_everything_sorts_as_the_slowest() -> None:
    runs = [fleet(None), fleet(0.5), fleet(0.6)]
    assert bench.median_run(runs).wall_s == 0.6


def test_the_simulator_runs_the_same_number_of_processes_at_every_curve_size() -> None:
    for agents in (1_000, 2_500, 5_000, 10_000):
        per_process = bench.sim_per_process(agents)
        assert -(-agents // per_process) == bench.SIM_PROCESSES  # processes: ceil(agents / each)


def test_a_small_fleet_keeps_the_simulators_least_agents_per_process() -> None:
    assert bench.sim_per_process(100) == bench.PER_PROCESS
