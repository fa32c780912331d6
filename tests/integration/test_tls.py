"""HTTPS between the components, on real processes: delivery works, and nobody unverified is trusted.

A TLS fleet (`LocalFleet(tls=True)`) has a private CA in its root; the NS and each task server
serve certificates with their 127.x address as IP SAN, task servers verify the NS and agents
verify their task server against that CA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.reliability import record
from tickle.testing.devca import DevCa
from tickle.testing.localfleet import TS_API_PORT, AgentSpec, LocalFleet

from .conftest import Factory, eventually, run_command, wait_run

pytestmark = [pytest.mark.integration, pytest.mark.attacks, pytest.mark.timeout(120)]
CERT_FAILED = "CERTIFICATE_VERIFY_FAILED"


@pytest.fixture
def extra_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts beside its fleet; terminated (then killed) at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_task_server(
    fleet: LocalFleet, name: str, host_octet: int, flags: list[str]
) -> tuple[subprocess.Popen[bytes], Path]:
    """A task server of the fleet's NS outside the fleet (own address, own TLS flags)."""
    host = f"{fleet.net}.{host_octet}"
    log = fleet.root / f"{name}.log"
    argv = [
        sys.executable, "-m", "tickle", "task-server", "--name", name, "--ns-url", fleet.ns_url,
        "--api-host", host,
        "--api-port", str(TS_API_PORT), "--tickle-host", host, "--tickle-port", "0",
        "--state-dir", str(fleet.root / name), "--ns-wait-s", "20", *flags,
    ]  # fmt: skip
    env = {  # never on argv
        **os.environ,
        "TICKLE_TS_ENROLLMENT_SECRET": fleet.enrollment_secret,
        "TICKLE_TS_AGENT_ENROLLMENT_SECRET": fleet.agent_enrollment_secret,
    }
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    return proc, log


async def registered_task_servers(fleet: LocalFleet) -> set[str]:
    async with fleet.client() as ns:
        return {ts.name for ts in await ns.task_servers()}


async def registered_computers(fleet: LocalFleet) -> set[str]:
    async with fleet.client() as ns:
        return {c.name for c in await ns.computers() if c.task_server}


async def test_fleet_over_https_delivers_run_now_by_tickle(fleet_factory: Factory) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("pc1", ["ts1"])], tls=True)
    assert fleet.ns_url.startswith("https://")
    assert fleet.ts_url("ts1").startswith("https://")
    started = time.monotonic()
    run = await run_command(fleet, ["pc1"], ["echo", "over tls"])
    run = await wait_run(fleet, run.id, 30)  # the interval is 1800 s: only a tickle explains this
    execution = run.executions[0]
    assert execution.status == "succeeded", execution
    assert execution.via == "tickle"
    assert "over tls" in (execution.output_tail or "")
    async with fleet.client() as ns:
        timeline = {s.step: s.at for s in (await ns.execution(execution.id)).timeline}
    assert timeline["recorded"] is not None
    # the APIs speak only TLS: a plain-HTTP request to either one gets no HTTP answer
    for url in (fleet.ns_url, fleet.ts_url("ts1")):
        plain = url.replace("https://", "http://") + "/health"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(plain) as resp:
                    await resp.read()
    record(
        case="TLS: whole fleet over HTTPS",
        done="run-now through NS -> TS -> agent with every API on HTTPS (private CA)",
        outcome="delivered by tickle, status recorded; plain HTTP gets no answer",
        sent=1,
        recorded=1,
        duplicated=0,
        seconds=round(time.monotonic() - started, 2),
    )


@pytest.mark.parametrize(
    ("case", "flags"),
    [("wrong CA", "other-ca"), ("system trust store only", "none")],
)
async def test_task_server_refuses_an_ns_whose_certificate_does_not_verify(
    fleet_factory: Factory,
    extra_procs: list[subprocess.Popen[bytes]],
    tmp_path: Path,
    case: str,
    flags: str,
) -> None:
    fleet = await fleet_factory(["ts1"], [], tls=True)
    tls_flags = []
    if flags == "other-ca":
        tls_flags = ["--ns-ca-file", str(DevCa(tmp_path / "other-ca", "Someone else").ca_file)]
    proc, log = start_task_server(fleet, "ts-doubt", 240, tls_flags)
    extra_procs.append(proc)
    started = time.monotonic()
    # it stops at once with the reason, instead of retrying as if the NS were down
    rc = proc.wait(30)
    took = time.monotonic() - started
    output = log.read_text()
    assert rc == 1, output
    assert CERT_FAILED in output, output
    assert "ns_ca_file" in output, output
    assert "stayed unreachable" not in output
    assert "ts-doubt" not in await registered_task_servers(fleet)
    assert "ts1" in await registered_task_servers(fleet)  # the NS itself is fine
    record(
        case=f"TLS: task server, NS certificate does not verify ({case})",
        done="task server with a CA that did not sign the NS certificate starts against it",
        outcome="refused: exit 1 naming ns_ca_file, no registration, no plain-HTTP retry",
        tried=1,
        recorded=0,
        seconds=round(took, 2),
    )


async def test_agent_refuses_a_task_server_whose_certificate_does_not_verify(
    fleet_factory: Factory, extra_procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    fleet = await fleet_factory(["ts1"], [AgentSpec("pc-good", ["ts1"])], tls=True)
    # an impostor task server on another address, holding a real certificate of the fleet's CA
    # issued for a different address (the NS's): the chain verifies, the name does not
    impostor_host = f"{fleet.net}.241"
    cert, key = fleet.certs["ns"]
    assert fleet.ca_file is not None
    proc, _ = start_task_server(
        fleet, "ts-impostor", 241,
        ["--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--ns-ca-file", str(fleet.ca_file)],
    )  # fmt: skip
    extra_procs.append(proc)
    await eventually(
        lambda: _has(registered_task_servers(fleet), "ts-impostor"), 20, "the impostor to start"
    )
    other_ca = DevCa(tmp_path / "other-ca", "Someone else").ca_file
    fleet.add_agent(AgentSpec("pc-wrong-ca", ["ts1"], extra=["--ca-file", str(other_ca)]))
    fleet.add_agent(AgentSpec("pc-misdirected", ["ts1"]))
    impostor_url = f"https://{impostor_host}:{TS_API_PORT}"
    fleet.procs["pc-misdirected"].argv = [
        impostor_url if a == fleet.ts_url("ts1") else a for a in fleet.procs["pc-misdirected"].argv
    ]
    assert impostor_url in fleet.procs["pc-misdirected"].argv
    for name in ("pc-wrong-ca", "pc-misdirected"):
        fleet.spawn(name)
    started = time.monotonic()

    async def both_refused() -> bool:
        return all(CERT_FAILED in fleet.log_tail(n, 200) for n in ("pc-wrong-ca", "pc-misdirected"))

    await eventually(both_refused, 20, "both agents to log a certificate failure")
    assert "IP address mismatch" in fleet.log_tail("pc-misdirected", 200)
    computers = await registered_computers(fleet)
    assert "pc-good" in computers  # same fleet, verifying agent: registered
    assert not {"pc-wrong-ca", "pc-misdirected"} & computers
    for name in ("pc-wrong-ca", "pc-misdirected"):
        assert fleet.procs[name].running()  # the agent keeps trying; it never downgrades
        assert "registered with task server" not in fleet.log_tail(name, 200)
    took = round(time.monotonic() - started, 2)
    record(
        case="TLS: agent, wrong CA",
        done="agent whose ca_file did not sign the task server certificate registers",
        outcome="refused: certificate verify failed, no registration, keeps retrying",
        tried=1,
        recorded=0,
        seconds=took,
    )
    record(
        case="TLS: agent, certificate of another host",
        done="impostor task server presents a genuine certificate of the CA issued for another IP",
        outcome="refused: IP address mismatch, no registration",
        tried=1,
        recorded=0,
        seconds=took,
    )


async def _has(names: Awaitable[set[str]], name: str) -> bool:
    return name in await names
