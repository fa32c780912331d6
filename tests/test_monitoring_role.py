"""The tickle_monitoring role (playbooks/monitoring.yml), run by the deploy venv's ansible-playbook
on localhost: off by default; on, it writes a file_sd target file per tier from the inventory and
the scrape jobs reading them, which `promtool check config` accepts together with the alert
rules; a second run changes nothing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_tools import LOCAL_HOST, ROOT, ansible_playbook, controller_env

FLEET = {
    "notification_servers": {"ns1": {"ansible_host": "192.0.2.1"}},
    "task_servers": {
        "ts1": {},
        "ts2": {
            "tickle_task_server_tls": False,
            "tickle_task_server_api_port": 6000,
            "tickle_task_server_advertise_host": "ts2.example",
        },
    },
    "client_task_agents": {
        "a1": {
            "ansible_host": "192.0.2.11",
            "tickle_client_task_agent_metrics_port": 9100,
            "tickle_client_task_agent_metrics_host": "0.0.0.0",
        },
        "a2": {},  # no metrics port: nothing to scrape
        "a3": {"tickle_client_task_agent_metrics_port": 9100},  # on loopback only
        "a4": {
            "tickle_client_task_agent_metrics_port": 9200,
            "tickle_client_task_agent_metrics_host": "192.0.2.14",
        },
    },
}
JOBS = ["tickle-notification-server", "tickle-task-server", "tickle-agent"]


class Prometheus:
    """This machine as the inventory's Prometheus host, with its configuration under tmp."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.sd_dir = tmp / "prometheus" / "file_sd"
        self.scrape_file = tmp / "prometheus" / "scrape_configs" / "tickle.yml"
        self.ca_file = tmp / "prometheus" / "tickle-ca.crt"
        ca_src = tmp / "fleet-ca.crt"
        ca_src.write_text(
            "-----BEGIN CERTIFICATE-----\n(the fleet CA)\n-----END CERTIFICATE-----\n"
        )
        monitoring = {**LOCAL_HOST, "ansible_become": False,
                      "tickle_monitoring_file_sd_dir": str(self.sd_dir),
                      "tickle_monitoring_scrape_config_file": str(self.scrape_file),
                      "tickle_monitoring_ca_file": str(self.ca_file),
                      "tickle_monitoring_ca_src": str(ca_src)}  # fmt: skip
        children: dict[str, Any] = {"tickle_monitoring": {"hosts": {"localhost": monitoring}}}
        children |= {group: {"hosts": hosts} for group, hosts in FLEET.items()}
        self.inventory = tmp / "hosts.yml"
        self.inventory.write_text(yaml.safe_dump({"all": {"children": children}}))
        self.env = controller_env(tmp)

    def run(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return ansible_playbook(
            self.env, self.inventory, ROOT / "playbooks" / "monitoring.yml", *extra
        )

    def targets(self, job: str) -> list[dict[str, Any]]:
        loaded: list[dict[str, Any]] = yaml.safe_load((self.sd_dir / f"{job}.yml").read_text())
        return loaded


@pytest.fixture
def prometheus(tmp_path: Path) -> Prometheus:
    return Prometheus(tmp_path)


def test_off_by_default_nothing_is_written(prometheus: Prometheus) -> None:
    run = prometheus.run()
    assert run.returncode == 0, run.stdout + run.stderr
    assert not (prometheus.tmp / "prometheus").exists()


def test_targets_per_tier_from_the_inventory(prometheus: Prometheus) -> None:
    run = prometheus.run("-e", "tickle_monitoring_enabled=true")
    assert run.returncode == 0, run.stdout + run.stderr
    assert prometheus.targets("tickle-notification-server") == [
        {"targets": ["192.0.2.1:50120"], "labels": {"__scheme__": "https", "tickle_host": "ns1"}}
    ]
    assert prometheus.targets("tickle-task-server") == [
        {"targets": ["ts1:50121"], "labels": {"__scheme__": "https", "tickle_host": "ts1"}},
        {"targets": ["ts2.example:6000"], "labels": {"__scheme__": "http", "tickle_host": "ts2"}},
    ]
    assert prometheus.targets("tickle-agent") == [
        {"targets": ["192.0.2.11:9100"], "labels": {"__scheme__": "http", "tickle_host": "a1"}},
        {"targets": ["192.0.2.14:9200"], "labels": {"__scheme__": "http", "tickle_host": "a4"}},
    ]
    jobs = yaml.safe_load(prometheus.scrape_file.read_text())["scrape_configs"]
    assert [job["job_name"] for job in jobs] == JOBS
    assert prometheus.ca_file.read_text().startswith("-----BEGIN CERTIFICATE-----")
    again = prometheus.run("-e", "tickle_monitoring_enabled=true")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "changed=0" in again.stdout


def test_promtool_accepts_the_scrape_jobs_with_the_rules(prometheus: Prometheus) -> None:
    run = prometheus.run("-e", "tickle_monitoring_enabled=true")
    assert run.returncode == 0, run.stdout + run.stderr
    config = {
        "global": {"scrape_interval": "30s"},
        "rule_files": [str(p) for p in sorted((ROOT / "monitoring" / "rules").glob("*.yml"))],
        # what scrape_config_files does on Prometheus >= 2.43 (Debian 12's promtool is 2.42)
        "scrape_configs": yaml.safe_load(prometheus.scrape_file.read_text())["scrape_configs"],
    }
    path = prometheus.tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make sysdeps` installs it (Debian package prometheus)"
    check = subprocess.run([promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # promtool reads the file_sd files too: a broken one fails the check
    (prometheus.sd_dir / "tickle-agent.yml").write_text("- targets: [unclosed\n")
    broken = subprocess.run(
        [promtool, "check", "config", str(path)], capture_output=True, text=True
    )
    assert broken.returncode != 0
    assert "tickle-agent.yml" in broken.stdout + broken.stderr


def test_a_scrape_interval_out_of_range_is_refused_by_name(prometheus: Prometheus) -> None:
    run = prometheus.run(
        "-e", "tickle_monitoring_enabled=true", "-e", "tickle_monitoring_scrape_interval_s=1"
    )
    assert run.returncode != 0
    assert "tickle_monitoring_scrape_interval_s must be 5..3600 seconds, not 1" in run.stdout
    assert not prometheus.scrape_file.exists()
