"""A step's whole output, cut at the agent's cap with both ends and a marker, and each step of a
job with its exit code, times and output — through the real path (agent outbox → task server
cache → NS) and `tickle output`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tickle.agent.output import cut_marker
from tickle.messages import OUTPUT_MAX_BYTES, JobCreate, RunCreate, TaskCreate
from tickle.testing.localfleet import AgentSpec, LocalFleet

from .conftest import Factory, wait_run

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]
MIB = 1024 * 1024


def tickle_cli(fleet: LocalFleet, *args: str) -> subprocess.CompletedProcess[str]:
    """`tickle ARGS` against the fleet's NS, as an operator types it."""
    argv = [sys.executable, "-m", "tickle", "--ns-url", fleet.ns_url, "--admin-token",
            fleet.admin_token, *args]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


async def test_output_of_3_mib_is_cut_to_the_cap_with_both_ends_and_the_marker(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("a1", ["ts1"])])
    # 3 MiB on stdout between two marked lines, and a line on stderr
    script = "echo HEAD-LINE; head -c 3145728 /dev/zero | tr '\\0' x; echo; echo TAIL-LINE; echo warn >&2"
    async with fleet.client() as ns:
        task = await ns.add_task(TaskCreate(name="big", script=script, timeout_s=60))
        run = await ns.run_now(RunCreate(task_id=task.id, computers=["a1"]))
    run = await wait_run(fleet, run.id, 60)
    execution = run.executions[0]
    assert execution.status == "succeeded", execution
    async with fleet.client() as ns:
        output = await ns.output(execution.id)
    [step] = output.steps
    total = len("HEAD-LINE\n") + 3 * MIB + len("\nTAIL-LINE\n")
    kept = OUTPUT_MAX_BYTES - len("warn\n")  # stderr is small: stdout gets the rest of the cap
    assert step.stderr == "warn\n"
    assert step.stdout.startswith("HEAD-LINE\nxxxx")
    assert step.stdout.endswith("xxxx\nTAIL-LINE\n")
    marker = cut_marker(total - kept)
    assert marker in step.stdout
    assert len(step.stdout) == kept + len(marker)
    # the summary of the run shows the last bytes only
    assert len(execution.output_tail or "") <= 4096
    # `tickle output` prints both streams, each under its own header
    shown = tickle_cli(fleet, "output", str(execution.id))
    assert shown.returncode == 0, shown.stderr
    assert "=== step 0 (big) stdout ===\nHEAD-LINE\n" in shown.stdout
    assert "TAIL-LINE\n=== step 0 (big) stderr ===\nwarn\n" in shown.stdout
    assert marker.strip() in shown.stdout


async def test_a_three_step_job_keeps_each_step_s_exit_code_times_and_output(
    fleet_factory: Factory,
) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("a1", ["ts1"])])
    async with fleet.client() as ns:
        ids = [
            (await ns.add_task(TaskCreate(name=name, script=text))).id
            for name, text in (
                ("fetch", "echo fetched; echo note >&2"),
                ("build", "echo built; sleep 0.2"),
                ("check", "echo checking; echo bad >&2; exit 3"),
            )
        ]
        job = await ns.add_job(JobCreate(name="pipeline", task_ids=ids))
        run = await ns.run_now(RunCreate(job_id=job.id, computers=["a1"]))
    run = await wait_run(fleet, run.id, 30)
    execution = run.executions[0]
    assert (execution.status, execution.exit_code) == ("failed", 3)
    assert [(s.step, s.name, s.status, s.exit_code) for s in execution.steps] == [
        (0, "fetch", "succeeded", 0),
        (1, "build", "succeeded", 0),
        (2, "check", "failed", 3),
    ]
    times = [(s.started_at, s.finished_at) for s in execution.steps]
    assert all(a is not None and b is not None and a <= b for a, b in times), times
    flat = [t for pair in times for t in pair]
    assert flat == sorted(flat), "the steps ran one after the other"  # type: ignore[type-var]
    assert times[1][1] - times[1][0] >= 0.2  # type: ignore[operator]
    async with fleet.client() as ns:
        output = await ns.output(execution.id)
        second = await ns.output(execution.id, step=1)
    assert [(s.step, s.stdout, s.stderr) for s in output.steps] == [
        (0, "fetched\n", "note\n"),
        (1, "built\n", ""),
        (2, "checking\n", "bad\n"),
    ]
    assert [(s.step, s.stdout) for s in second.steps] == [(1, "built\n")]
    # the timeline shows the steps
    shown = tickle_cli(fleet, "timeline", str(execution.id))
    assert shown.returncode == 0, shown.stderr
    assert "steps of execution" in shown.stdout
    for name in ("fetch", "build", "check"):
        assert name in shown.stdout
    one = tickle_cli(fleet, "output", str(execution.id), "--step", "2")
    assert (
        one.stdout
        == "=== step 2 (check) stdout ===\nchecking\n=== step 2 (check) stderr ===\nbad\n"
    )
    missing = tickle_cli(fleet, "output", str(execution.id), "--step", "7")
    assert missing.returncode == 1
    assert "has no step 7" in missing.stderr


async def test_an_event_over_the_task_server_s_body_limit_gets_through_without_its_output(
    fleet_factory: Factory,
) -> None:
    # a task server that takes bodies of 64 KiB at most, an agent keeping 1 MiB per step
    fleet = await fleet_factory(
        ["ts1"], [AgentSpec("a1", ["ts1"])], ts_extra=["--max-body-bytes", "65536"]
    )
    async with fleet.client() as ns:
        task = await ns.add_task(
            TaskCreate(name="chatty", script="head -c 200000 /dev/zero | tr '\\0' y; echo; exit 5")
        )
        run = await ns.run_now(RunCreate(task_id=task.id, computers=["a1"]))
    execution = (await wait_run(fleet, run.id, 30)).executions[0]
    assert (execution.status, execution.exit_code) == ("failed", 5)
    assert (execution.output_tail or "").endswith("yyy\n")  # the summary fits: it is kept
    async with fleet.client() as ns:
        [step] = (await ns.output(execution.id)).steps
    assert step.stdout == ""
    assert step.stderr == (
        "[tickle] 200001 characters of stdout and 0 of stderr dropped: over the next hop's"
        " max_body_bytes\n"
    )
