"""The Tickle fleet under test, read from an Ansible inventory.

Hosts are reached with testinfra: Molecule/testbed containers directly with `podman exec` (about
ten times faster than the ansible backend), every other host through Ansible's own connection
settings from the inventory (ssh, become). Calls to the NS API go out from the NS host itself, to
its own API on loopback, with the admin token from its configuration file: the controller needs no
route to the API and no copy of the secrets.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar

NS_UNIT = "tickle-notification-server.service"
TS_UNIT = "tickle-task-server.service"
AGENT_UNIT = "tickle-client-task-agent.service"
FIREWALL_UNIT = "tickle-firewall.service"
# The testbed's site services (molecule/shared/prepare.yml): absent from a real fleet's inventory.
SERVICES_GROUP = "testbed_services"
INDEX_UNIT = "testbed-index.service"
DB_UNIT = "postgresql@15-main.service"
NS_CONFIG = "/etc/tickle/notification-server.toml"
TS_CONFIG = "/etc/tickle/task-server.toml"
AGENT_CONFIG = "/etc/tickle/client-task-agent.toml"
TICKLE = "/opt/tickle/venv/bin/tickle"
FINAL = {"succeeded", "failed", "timed_out", "interrupted"}
PLAYBOOKS = Path(__file__).resolve().parent.parent.parent / "playbooks"
T = TypeVar("T")

# Runs on a host: one HTTP call to a local tickle API, with the credentials from its config file.
_LOCAL_API = r"""
import json, ssl, sys, tomllib, urllib.error, urllib.request
config, method, path, body = sys.argv[1:5]
with open(config, "rb") as f:
    cfg = tomllib.load(f)
if cfg.get("secrets_file"):  # the admin token lives in the secrets file the config names
    with open(cfg["secrets_file"], "rb") as f:
        cfg.update(tomllib.load(f))
host = cfg.get("api_host", "127.0.0.1")
host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
default_port = 50120 if "notification" in config else 50121
scheme = "https" if cfg.get("tls_cert_file") else "http"
context = ssl.create_default_context(cafile="/etc/tickle/tls/ca.crt") if scheme == "https" else None
url = f"{scheme}://{host}:{cfg.get('api_port', default_port)}{path}"
headers = {"Content-Type": "application/json"}
if "admin_token" in cfg:
    headers["Authorization"] = "Bearer " + cfg["admin_token"]
req = urllib.request.Request(url, method=method, data=body.encode() or None, headers=headers)
try:
    with urllib.request.urlopen(req, timeout=15, context=context) as resp:
        sys.stdout.write(resp.read().decode())
except urllib.error.HTTPError as exc:
    sys.stderr.write(f"{method} {path}: HTTP {exc.code}: {exc.read().decode()}")
    sys.exit(3)
"""


@dataclass
class FleetHost:
    """One host of the fleet, its part in it and its testinfra handle."""

    name: str
    hostvars: dict[str, Any]
    groups: set[str]
    inventory: str

    def __repr__(self) -> str:
        return self.name

    @cached_property
    def host(self) -> Any:
        import testinfra  # here, so that the helpers below import without it (tests/test_molecule.py)

        if "podman" in str(self.hostvars.get("ansible_connection", "")):
            return testinfra.get_host(f"podman://{self.name}")
        return testinfra.get_host(
            f"ansible://{self.name}?ansible_inventory={self.inventory}", sudo=True
        )

    @property
    def is_ns(self) -> bool:
        return "notification_servers" in self.groups

    @property
    def is_task_server(self) -> bool:
        return "task_servers" in self.groups

    @property
    def is_agent(self) -> bool:
        return "client_task_agents" in self.groups

    @property
    def cem(self) -> bool:
        return _bool(self.hostvars.get("tickle_client_task_agent_cem", False))

    @property
    def tickles_blocked(self) -> bool:
        return _bool(self.hostvars.get("tickle_firewall_block_tickles", False))

    @property
    def ts_tickle_port(self) -> int:
        """UDP port this host's task server rules use (its task server's, else the default)."""
        return int(self.hostvars.get("tickle_task_server_tickle_port", 50123))

    @property
    def agent_tickle_port(self) -> int:
        """UDP port this host's agent listens for tickles on."""
        return int(self.hostvars.get("tickle_client_task_agent_tickle_port", 50124))

    @property
    def api_ports(self) -> list[int]:
        """TCP API ports the firewall keeps open on this host (the NS's and the task server's)."""
        ports = [
            int(self.hostvars.get("tickle_notification_server_api_port", 50120)),
            int(self.hostvars.get("tickle_task_server_api_port", 50121)),
        ]
        return list(dict.fromkeys(ports))

    @property
    def computer_name(self) -> str:
        return str(self.hostvars.get("tickle_client_task_agent_name", self.name))

    @property
    def task_server_name(self) -> str:
        """This task server's name at the NS."""
        return str(self.hostvars.get("tickle_task_server_name", self.name))

    @property
    def is_services(self) -> bool:
        """A site-services host of the testbed (database, package index), not a Tickle host."""
        return SERVICES_GROUP in self.groups

    @property
    def install_from(self) -> str:
        return str(self.hostvars.get("tickle_install_from", "wheelhouse"))

    @property
    def units(self) -> list[str]:
        if self.is_services:
            return [INDEX_UNIT, DB_UNIT]
        units = [FIREWALL_UNIT]
        if self.is_ns:
            units.append(NS_UNIT)
        if self.is_task_server:
            units.append(TS_UNIT)
        if self.is_agent:
            units.append(AGENT_UNIT)
        return units

    def run(self, command: str, *args: str) -> Any:
        return self.host.run(command, *args)

    def check(self, command: str, *args: str) -> str:
        """Run a command that must succeed; return its stdout."""
        result = self.host.run(command, *args)
        assert result.rc == 0, (
            f"{self.name}: {result.command!r} failed ({result.rc}): {result.stderr}"
        )
        return str(result.stdout)

    def local_api(self, config: str, method: str, path: str, body: Any = None) -> Any:
        """Call a tickle API on this host's loopback; return the decoded JSON (or text)."""
        payload = json.dumps(body) if body is not None else ""
        out = self.check("python3 -c %s %s %s %s %s", _LOCAL_API, config, method, path, payload)
        try:
            return json.loads(out)
        except json.JSONDecodeError:
            return out

    def journal(self, lines: int = 60) -> str:
        """The recent journal of this host's tickle units (shown when a check fails)."""
        units = " ".join(f"-u {shlex.quote(u)}" for u in self.units)
        result = self.host.run(f"journalctl --no-pager -n {lines} {units}")
        return f"--- journal of {self.name} ({', '.join(self.units)}) ---\n{result.stdout}"

    def agent_status(self) -> dict[str, Any]:
        """`tickle agent status`: the agent's own view (registration, policy, polls); its times
        (printed in ISO 8601) as unix seconds, to compare with time.time()."""
        status = json.loads(self.check(f"{TICKLE} agent status --config {AGENT_CONFIG}"))
        return {
            k: datetime.fromisoformat(v).timestamp()
            if k.endswith("_at") and isinstance(v, str)
            else v
            for k, v in status.items()
        }

    def ipv4_addresses(self) -> list[str]:
        out = self.check("ip -4 -o addr show scope global")
        return [line.split()[3].split("/")[0] for line in out.splitlines() if line.strip()]


@dataclass
class Fleet:
    """Every Tickle host of an inventory, by tier."""

    inventory: str
    hosts: list[FleetHost] = field(default_factory=list)
    services: list[FleetHost] = field(default_factory=list)

    @classmethod
    def from_inventory(cls, inventory: str) -> Fleet:
        out = subprocess.run(
            ["ansible-inventory", "-i", inventory, "--list"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
        data = json.loads(out)
        hostvars = data.get("_meta", {}).get("hostvars", {})
        groups: dict[str, set[str]] = {}

        def walk(group: str, seen: set[str]) -> set[str]:
            if group in seen:
                return set()
            seen.add(group)
            node = data.get(group, {})
            members = set(node.get("hosts", []))
            for child in node.get("children", []):
                members |= walk(child, seen)
            return members

        for group in ("notification_servers", "task_servers", "client_task_agents"):
            for name in walk(group, set()):
                groups.setdefault(name, set()).add(group)
        hosts = [
            FleetHost(name, hostvars.get(name, {}), groups[name], inventory)
            for name in sorted(groups)
        ]
        services = [
            FleetHost(name, hostvars.get(name, {}), {SERVICES_GROUP}, inventory)
            for name in sorted(walk(SERVICES_GROUP, set()))
        ]
        return cls(inventory, hosts, services)

    @property
    def ns(self) -> FleetHost:
        return next(h for h in self.hosts if h.is_ns)

    @property
    def task_servers(self) -> list[FleetHost]:
        return [h for h in self.hosts if h.is_task_server]

    @property
    def agents(self) -> list[FleetHost]:
        return [h for h in self.hosts if h.is_agent]

    @property
    def tickle_reachable_agents(self) -> list[FleetHost]:
        """Agents that take tickles: not CEM, not behind the blocking switch."""
        return [a for a in self.agents if not a.cem and not a.tickles_blocked]

    @property
    def blocked_agents(self) -> list[FleetHost]:
        """Non-CEM agents whose firewall drops every tickle."""
        return [a for a in self.agents if a.tickles_blocked and not a.cem]

    @property
    def cem_agents(self) -> list[FleetHost]:
        return [a for a in self.agents if a.cem]

    def task_servers_of(self, agent: FleetHost) -> list[FleetHost]:
        """The task servers an agent may use: its list in the inventory, else all of them."""
        wanted = agent.hostvars.get("tickle_client_task_agent_task_servers")
        if isinstance(wanted, list) and wanted:
            return [h for h in self.task_servers if h.name in wanted]
        return self.task_servers

    @property
    def configured_database(self) -> str:
        """The NS's database as the inventory says: postgresql or sqlite."""
        url = str(self.ns.hostvars.get("tickle_notification_server_database_url", "")).strip()
        return "postgresql" if url.startswith("postgres") else "sqlite"

    def ns_api(self, method: str, path: str, body: Any = None) -> Any:
        return self.ns.local_api(NS_CONFIG, method, path, body)

    def settings(self) -> dict[str, Any]:
        return dict(self.ns_api("GET", "/api/settings"))

    def computers(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in self.ns_api("GET", "/api/computers")}

    def run_now(self, command: str, agents: list[FleetHost]) -> dict[str, Any]:
        """Define a task and run it now on these agents; return the run (RunOut)."""
        task = self.ns_api(
            "POST", "/api/tasks",
            {"name": f"verify-{time.time_ns()}", "command": ["/bin/sh", "-c", command],
             "timeout_s": 60},
        )  # fmt: skip
        return dict(
            self.ns_api(
                "POST", "/api/runs",
                {"task_id": task["id"], "computers": [a.computer_name for a in agents],
                 "groups": []},
            )
        )  # fmt: skip

    def wait_run(self, run_id: int, timeout_s: float) -> dict[str, Any]:
        """Poll the run until every execution is final or the time is up; return the last view."""
        deadline = time.monotonic() + timeout_s
        while True:
            run = dict(self.ns_api("GET", f"/api/runs/{run_id}"))
            if all(e["status"] in FINAL for e in run["executions"]):
                return run
            if time.monotonic() > deadline:
                return run
            time.sleep(0.5)

    def execution(self, execution_id: int) -> dict[str, Any]:
        return dict(self.ns_api("GET", f"/api/executions/{execution_id}"))


class Run:
    """One ansible-playbook run: its exit code, output and seconds taken."""

    def __init__(self, fleet: Fleet, playbook: str, *args: str) -> None:
        start = time.monotonic()
        done = subprocess.run(
            ["ansible-playbook", "-i", fleet.inventory, str(PLAYBOOKS / playbook), *args],
            capture_output=True, text=True, timeout=900,
            env={**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0"},
        )  # fmt: skip
        self.took = time.monotonic() - start
        self.rc = done.returncode
        self.out = done.stdout + done.stderr

    def recap(self, host: FleetHost) -> dict[str, int]:
        match = re.search(rf"^{re.escape(host.name)}\s*:\s*(.*)$", self.out, re.M)
        assert match, f"{host} not in the play recap:\n{self.out[-3000:]}"
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}

    def __repr__(self) -> str:
        return f"rc={self.rc} after {self.took:.0f} s:\n{self.out[-4000:]}"


def check_index_served(index: FleetHost, hosts: list[FleetHost]) -> None:
    """Every one of `hosts` asked the package index on `index` for tickle and downloaded it."""
    log = index.check(f"journalctl --no-pager -o cat -u {INDEX_UNIT}")
    for host in hosts:
        addresses = host.ipv4_addresses()
        mine = [line for line in log.splitlines() if line.split(" ", 1)[0] in addresses]
        assert any('"GET /simple/tickle/ ' in line for line in mine), (
            f"{host} ({addresses}) never asked the index on {index} for tickle"
        )
        assert any('"GET /files/tickle-' in line for line in mine), (
            f"{host} ({addresses}) never downloaded the tickle wheel from the index on {index}"
        )


def check_ns_writes_to_postgresql(fleet: Fleet, database: FleetHost) -> None:
    """The NS says it uses PostgreSQL on `database`, and a task defined through it is a row there."""
    about = fleet.ns_api("GET", "/api/about")
    assert about["database"] == "postgresql", about
    assert database.name in about["database_location"], about
    name = f"verify-db-{time.time_ns()}"
    fleet.ns_api("POST", "/api/tasks", {"name": name, "command": ["/bin/true"], "timeout_s": 10})
    count = database.check(
        "runuser -u postgres -- psql -d tickle -tAc %s",
        f"SELECT count(*) FROM tasks WHERE name = '{name}'",
    )
    assert count.strip() == "1", f"task {name} is not in PostgreSQL on {database}"


def steps(execution: dict[str, Any]) -> dict[str, float | None]:
    """An execution's timeline as {step: time}."""
    return {s["step"]: s["at"] for s in execution.get("timeline", [])}


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of one Prometheus metric whose labels include `labels`.

    A metric (or label set) the text does not expose is an error, never a silent 0: a renamed
    metric or label must fail the check that reads it.
    """
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric_name, _, label_text = head.partition("{")
        if metric_name != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
            found = True
    if not found:
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        raise AssertionError(f"metric {name}{{{wanted}}} is not exposed")
    return total


def wait_for(what: str, check: Callable[[], T | None], timeout_s: float, every_s: float = 1.0) -> T:
    """Call `check` until it returns a value other than None; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value is not None:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(every_s)


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)
