"""A fleet of real Tickle processes on loopback addresses: for the demo, tests and benchmarks.

Each component runs as its own process (`python -m tickle ...`) with its own state directory and
loopback address (127.X.Y.N), with the default ports, so a fleet on one machine behaves like one
on a network. It talks to them as an operator would: over their APIs, and over the agents'
control sockets through `tickle.agent.control`, the one component module it imports. With
`tls=True` the APIs speak HTTPS with certificates of a private CA made in the fleet root (needs
`cryptography`). The fleet's admin token and its two enrollment secrets (the task servers', the
agents') reach the processes in their environment, never on their command lines, which every local
user can read in /proc/PID/cmdline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tickle import http
from tickle.agent.control import control_call
from tickle.console import NsClient
from tickle.http import ApiError

NS_API_PORT = 50120
TS_API_PORT = 50121
TS_TICKLE_PORT = 50123
AGENT_TICKLE_PORT = 50124
BLACKHOLE_PORT = 50199


@dataclass
class AgentSpec:
    """One agent: which task servers (by name, first reachable wins), CEM or not, blocked or not.

    A blocked agent advertises a tickle port where nothing listens, so every tickle sent to it is
    lost as if a firewall dropped it; it can only get work by polling.
    """

    name: str
    task_servers: list[str]
    cem: bool = False
    blocked: bool = False
    groups: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    # more environment for its process (e.g. the test-only clock offset, clock.TEST_OFFSET_ENV)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen[bytes] | None = None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


async def scrape_metric(url: str, name: str, timeout_s: float = 5.0) -> float | None:
    """The sum of one metric's samples on a component's /metrics (None: no answer)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            # only that metric: a whole scrape makes the NS count its computers (9.7 ms at
            # 10,000, against 1.4)
            session.get(url + "/metrics", params={"name[]": name}) as resp,
        ):
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError):
        return None
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


class FleetError(Exception):
    """A fleet process failed to start or answer in time; the message includes its log tail."""


class LocalFleet:
    """Starts, stops, kills and restarts an NS, task servers and agents on loopback."""

    def __init__(
        self,
        root: Path,
        task_servers: list[str],
        agents: list[AgentSpec],
        net: str = "127.0.0",
        admin_token: str | None = None,
        enrollment_secret: str | None = None,
        agent_enrollment_secret: str | None = None,
        ns_extra: list[str] | None = None,
        ts_extra: list[str] | None = None,
        python: str = sys.executable,
        tls: bool = False,
    ) -> None:
        self.root = root
        self.net = net
        self.scheme = "https" if tls else "http"
        self.admin_token = admin_token or secrets.token_urlsafe(24)
        # the task servers' enrollment secret (the NS checks it) and the agents' (task servers do)
        self.enrollment_secret = enrollment_secret or secrets.token_urlsafe(24)
        self.agent_enrollment_secret = agent_enrollment_secret or secrets.token_urlsafe(24)
        self.python = python
        self.ns_host = f"{net}.1"
        self.ns_url = f"{self.scheme}://{self.ns_host}:{NS_API_PORT}"
        self.ts_hosts = {name: f"{net}.{2 + i}" for i, name in enumerate(task_servers)}
        self._agent_base = 2 + len(task_servers) + 8
        self.agent_hosts = {a.name: f"{net}.{self._agent_base + i}" for i, a in enumerate(agents)}
        self.agents = {a.name: a for a in agents}
        self.procs: dict[str, Proc] = {}
        self.extra_ns: dict[str, str] = {}  # another NS process on the same database: name -> host
        self._ns_extra = ns_extra or []
        root.mkdir(parents=True, exist_ok=True)
        self.ca_file: Path | None = None
        self.certs: dict[str, tuple[Path, Path]] = {}  # server name -> (certificate, key)
        if tls:
            self._make_certificates()
        self._add("ns", self._ns_args(ns_extra or []))
        for name, host in self.ts_hosts.items():
            self._add(name, self._ts_args(name, host, ts_extra or []))
        for spec in agents:
            self._add(spec.name, self._agent_args(spec))

    def ts_url(self, name: str) -> str:
        return f"{self.scheme}://{self.ts_hosts[name]}:{TS_API_PORT}"

    def client(self) -> NsClient:
        """An operator client of the fleet's NS (use as `async with`)."""
        return NsClient(self.ns_url, self.admin_token, ca_file=self.ca_file)

    def add_agent(self, spec: AgentSpec) -> None:
        """Add an agent after construction (start it with `spawn`); `stop()` stops it too."""
        self.agent_hosts[spec.name] = f"{self.net}.{self._agent_base + len(self.agent_hosts)}"
        self.agents[spec.name] = spec
        self._add(spec.name, self._agent_args(spec))

    def add_ns(self, name: str, host: str) -> str:
        """Add another NS process on `host`, with the first one's flags (`ns_extra`: share its
        PostgreSQL database), started after it by `start`; return its URL."""
        self.extra_ns[name] = host
        args = self._ns_args(self._ns_extra, host, name)
        self._add(name, args)
        return f"{self.scheme}://{host}:{NS_API_PORT}"

    def set_ts_ns_url(self, task_server: str, ns_url: str) -> None:
        """Point a task server (before it starts) at another NS process of `add_ns`."""
        argv = self.procs[task_server].argv
        argv[argv.index("--ns-url") + 1] = ns_url

    async def start(self, deadline_s: float = 30.0) -> None:
        """Start every process in tier order and wait until each answers / is registered."""
        self._check_ports_free()
        self.spawn("ns")
        await self.wait_healthy(self.ns_url, "ns", deadline_s)
        for name, host in self.extra_ns.items():
            self.spawn(name)
            await self.wait_healthy(f"{self.scheme}://{host}:{NS_API_PORT}", name, deadline_s)
        for name in self.ts_hosts:
            self.spawn(name)
        for name in self.ts_hosts:
            await self.wait_healthy(self.ts_url(name), name, deadline_s)
        for name in self.agents:
            self.spawn(name)
        await self.wait_registered(list(self.agents), deadline_s)
        await self.wait_first_pull(list(self.agents), deadline_s)

    async def stop(self) -> None:
        """SIGTERM every process (agents first), then SIGKILL what is left after 10 s."""
        order = [*self.agents, *self.ts_hosts, *self.extra_ns, "ns"]
        for name in order:
            self.signal(name, signal.SIGTERM)
        end = time.monotonic() + 10
        for name in order:
            proc = self.procs[name].popen
            if proc is None:
                continue
            try:
                await asyncio.to_thread(proc.wait, max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.signal(name, signal.SIGKILL)
                proc.wait()

    def spawn(self, name: str) -> None:
        proc = self.procs[name]
        if proc.running():
            return
        log = proc.log.open("ab")
        proc.popen = subprocess.Popen(
            proc.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._env(name),
            start_new_session=True,
        )
        log.close()

    def signal(self, name: str, sig: signal.Signals) -> None:
        proc = self.procs[name].popen
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)

    def kill(self, name: str) -> None:
        """SIGKILL a component (and whatever it started), as a crash would."""
        self.signal(name, signal.SIGKILL)
        proc = self.procs[name].popen
        if proc is not None:
            proc.wait()

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join(self.procs[name].log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def wait_healthy(self, url: str, name: str, deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        async with http.client_session(timeout_s=2, ca_file=self.ca_file) as session:
            while True:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url + "/health") as resp:
                        if resp.status == 200:
                            return
                self._check_alive(name)
                if time.monotonic() > end:
                    raise FleetError(f"{name} did not answer at {url} in {deadline_s}s:\n"
                                     + self.log_tail(name))  # fmt: skip
                await asyncio.sleep(0.05)

    async def wait_registered(self, names: list[str], deadline_s: float) -> None:
        end = time.monotonic() + deadline_s
        async with self.client() as ns:
            while True:
                known = {c.name for c in await ns.computers() if c.task_server}
                missing = [n for n in names if n not in known]
                if not missing:
                    return
                for n in missing:
                    self._check_alive(n)
                if time.monotonic() > end:
                    raise FleetError(
                        f"agents not registered in {deadline_s}s: {missing}\n"
                        + "\n".join(self.log_tail(n) for n in missing[:2])
                    )
                await asyncio.sleep(0.05)

    async def wait_first_pull(self, names: list[str], deadline_s: float) -> None:
        """Wait until each agent has made the pull it makes once registered (done or failed).

        Work created before that pull is taken by it, as a poll: a caller that wants to see a
        run-now delivered by tickle starts it after this.
        """
        end = time.monotonic() + deadline_s
        waiting = list(names)
        while waiting:
            for name in list(waiting):
                with contextlib.suppress(aiohttp.ClientError, OSError, ApiError):
                    status = await control_call(self.root / name / "agent.sock", "GET", "/status")
                    if status.get("last_pull_at") or status.get("last_error"):
                        waiting.remove(name)
                        continue
                self._check_alive(name)
            if waiting and time.monotonic() > end:
                raise FleetError(f"agents made no first pull in {deadline_s}s: {waiting}\n"
                                 + self.log_tail(waiting[0]))  # fmt: skip
            if waiting:
                await asyncio.sleep(0.05)

    def _check_ports_free(self) -> None:
        """Fail at once, naming the address, when another fleet still holds this one's ports."""
        wanted = [(self.ns_host, NS_API_PORT, socket.SOCK_STREAM)]
        for host in self.ts_hosts.values():
            wanted += [
                (host, TS_API_PORT, socket.SOCK_STREAM),
                (host, TS_TICKLE_PORT, socket.SOCK_DGRAM),
            ]
        for name, host in self.agent_hosts.items():
            if not self.agents[name].cem:
                wanted.append((host, AGENT_TICKLE_PORT, socket.SOCK_DGRAM))
        for host, port, kind in wanted:
            with socket.socket(socket.AF_INET, kind) as probe:
                if kind == socket.SOCK_STREAM:  # as uvicorn does: TIME_WAIT is no conflict
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((host, port))
                except OSError as exc:
                    raise FleetError(
                        f"{host}:{port} is in use ({exc.strerror}): is another fleet running there?"
                    ) from None

    def _check_alive(self, name: str) -> None:
        proc = self.procs[name].popen
        if proc is not None and proc.poll() is not None:
            raise FleetError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def _add(self, name: str, args: list[str]) -> None:
        self.procs[name] = Proc(
            name, [self.python, "-m", "tickle", *args], self.root / f"{name}.log"
        )

    def _ns_args(self, extra: list[str], host: str | None = None, name: str = "ns") -> list[str]:
        return [
            "ns", "--api-host", host or self.ns_host, "--api-port", str(NS_API_PORT),
            "--state-dir", str(self.root / name), *self._tls_args("ns"), *extra,
        ]  # fmt: skip

    def _ts_args(self, name: str, host: str, extra: list[str]) -> list[str]:
        return [
            "task-server", "--name", name, "--ns-url", self.ns_url,
            "--api-host", host, "--api-port", str(TS_API_PORT),
            "--tickle-host", host, "--tickle-port", str(TS_TICKLE_PORT),
            "--state-dir", str(self.root / name), *self._tls_args(name), *extra,
        ]  # fmt: skip

    def _agent_args(self, spec: AgentSpec) -> list[str]:
        host = self.agent_hosts[spec.name]
        urls = ",".join(self.ts_url(t) for t in spec.task_servers)
        args = [
            "agent", "--name", spec.name, "--task-servers", urls,
            "--tickle-host", host, "--tickle-port", str(AGENT_TICKLE_PORT),
            "--state-dir", str(self.root / spec.name), *self._tls_args(spec.name),
        ]  # fmt: skip
        if spec.cem:
            args.append("--cem")
        if spec.blocked:
            # tickles go to a port where nothing listens: lost, as behind a dropping firewall
            args += ["--advertise-port", str(BLACKHOLE_PORT)]
        for group in spec.groups:
            args += ["--groups", group]
        return [*args, *spec.extra]

    def _make_certificates(self) -> None:
        from tickle.testing.devca import DevCa  # dev-only dependency: imported only for a TLS fleet

        ca = DevCa(self.root / "tls")
        self.ca_file = ca.ca_file
        for name, host in {"ns": self.ns_host, **self.ts_hosts}.items():
            cert = ca.issue(name, [host])
            self.certs[name] = (cert.cert_file, cert.key_file)

    def _tls_args(self, name: str) -> list[str]:
        """Flags of one process: its server certificate, and the CA that verifies its servers."""
        if self.ca_file is None:
            return []
        args: list[str] = []
        if name in self.certs:
            cert, key = self.certs[name]
            args += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
        if name in self.ts_hosts:
            args += ["--ns-ca-file", str(self.ca_file)]
        elif name in self.agents:
            args += ["--ca-file", str(self.ca_file)]
        return args

    def _env(self, name: str) -> dict[str, str]:
        """The environment of process `name`: ours, less any TICKLE_ setting, plus its secrets
        (and an agent's own `env`)."""
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        for key in list(env):
            if key.startswith(("TICKLE_NS_", "TICKLE_TS_", "TICKLE_AGENT_", "TICKLE_TEST")):
                del env[key]  # the fleet's flags and secrets are the whole configuration
        if name == "ns" or name in self.extra_ns:
            env["TICKLE_NS_ADMIN_TOKEN"] = self.admin_token
            env["TICKLE_NS_ENROLLMENT_SECRET"] = self.enrollment_secret
        elif name in self.ts_hosts:
            env["TICKLE_TS_ENROLLMENT_SECRET"] = self.enrollment_secret
            env["TICKLE_TS_AGENT_ENROLLMENT_SECRET"] = self.agent_enrollment_secret
        else:
            env["TICKLE_AGENT_ENROLLMENT_SECRET"] = self.agent_enrollment_secret
            env.update(self.agents[name].env)
        return env
