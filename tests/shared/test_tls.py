"""The HTTPS settings: plain HTTP beyond loopback only by choice, certificates checked at start."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.reliability import record
from tickle.agent.service import main as agent_main
from tickle.agent.settings import AgentSettings
from tickle.config import ConfigError, load_settings
from tickle.ns.service import main as ns_main
from tickle.ns.settings import NsSettings
from tickle.taskserver.service import main as ts_main
from tickle.taskserver.settings import TaskServerSettings
from tickle.testing.devca import DevCa
from tickle.tls import is_loopback

SECRET = "--enrollment-secret=s3cret-s3cret-s3cret"
# a task server needs the agents' enrollment secret too (another one)
TS_SECRETS = [SECRET, "--agent-enrollment-secret=agent-s3cret-s3cret"]
Main = Callable[[list[str]], int]

# (what, component, its main, its settings class, flags: plain HTTP served or called beyond loopback)
BEYOND_LOOPBACK = [
    ("NS API on 0.0.0.0", "ns", ns_main, NsSettings, ["--api-host", "0.0.0.0"]),
    ("NS API on an address", "ns", ns_main, NsSettings, ["--api-host", "192.0.2.7"]),
    ("TS to http:// NS address", "task-server", ts_main, TaskServerSettings,
     [*TS_SECRETS, "--ns-url", "http://192.0.2.1:50120"]),
    ("TS to http:// NS name", "task-server", ts_main, TaskServerSettings,
     [*TS_SECRETS, "--ns-url", "http://ns.example:50120"]),
    ("TS API on 0.0.0.0", "task-server", ts_main, TaskServerSettings,
     [*TS_SECRETS, "--api-host", "0.0.0.0"]),
    ("agent to an http:// task server", "agent", agent_main, AgentSettings,
     [SECRET, "--task-servers", "https://a:1,http://ts:50121"]),
    ("agent to an http:// gateway", "agent", agent_main, AgentSettings,
     [SECRET, "--cem", "--gateway-url", "http://gw.example"]),
]  # fmt: skip
PREFIX = {"ns": "TICKLE_NS_", "task-server": "TICKLE_TS_", "agent": "TICKLE_AGENT_"}


@pytest.mark.attacks
@pytest.mark.parametrize(("what", "component", "main", "cls", "flags"), BEYOND_LOOPBACK)
def test_plain_http_beyond_loopback_stops_at_start_naming_allow_plain_http(
    what: str,
    component: str,
    main: Main,
    cls: type[object],
    flags: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main([*flags, "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tickle {component}: ")
    assert "allow_plain_http" in err
    assert f"{PREFIX[component]}ALLOW_PLAIN_HTTP" in err
    record(
        case=f"TLS: plain HTTP beyond loopback, no allow_plain_http ({what})",
        done=f"tickle {component} {' '.join(f for f in flags if f not in TS_SECRETS)}",
        outcome="refused at start: exit 2 naming allow_plain_http",
        tried=1,
    )


@pytest.mark.parametrize(("what", "component", "main", "cls", "flags"), BEYOND_LOOPBACK)
def test_plain_http_beyond_loopback_is_accepted_with_allow_plain_http(
    what: str, component: str, main: Main, cls: type[NsSettings], flags: list[str], tmp_path: Path
) -> None:
    settings = load_settings(cls, [*flags, "--state-dir", str(tmp_path), "--allow-plain-http"])
    assert settings.allow_plain_http is True


@pytest.mark.parametrize(
    ("cls", "flags"),
    [
        (NsSettings, ["--api-host", "127.0.0.5"]),
        (NsSettings, ["--api-host", "localhost"]),
        (
            TaskServerSettings,
            [*TS_SECRETS, "--ns-url", "http://127.3.0.1:50120", "--api-host", "::1"],
        ),
        (AgentSettings, [SECRET, "--task-servers", "http://localhost:50121,http://[::1]:50121"]),
        (AgentSettings, [SECRET, "--task-servers", "https://ts.example:50121"]),
    ],
)
def test_loopback_or_https_needs_no_choice(
    cls: type[NsSettings], flags: list[str], tmp_path: Path
) -> None:
    assert load_settings(cls, [*flags, "--state-dir", str(tmp_path)]).allow_plain_http is False


def test_a_certificate_lets_the_api_listen_beyond_loopback(tmp_path: Path) -> None:
    cert = DevCa(tmp_path).issue("ts", ["192.0.2.9"])
    flags = ["--tls-cert-file", str(cert.cert_file), "--tls-key-file", str(cert.key_file)]
    load_settings(NsSettings, ["--api-host", "0.0.0.0", *flags])
    ts = load_settings(TaskServerSettings, [*TS_SECRETS, "--api-host", "0.0.0.0", *flags])
    assert ts.agent_api_url(50121) == "https://127.0.0.1:50121"
    # a certificate does not cover the client side: plain HTTP to the NS is still refused
    with pytest.raises(ConfigError, match="allow_plain_http"):
        load_settings(TaskServerSettings, [*TS_SECRETS, "--ns-url", "http://10.1.1.1", *flags])


@pytest.mark.parametrize(
    ("cls", "flags", "setting"),
    [
        (NsSettings, ["--tls-cert-file", "{cert}"], "tls_key_file"),
        (TaskServerSettings, [*TS_SECRETS, "--tls-key-file", "{key}"], "tls_key_file"),
        (
            NsSettings,
            ["--tls-cert-file", "{cert}", "--tls-key-file", "{other_key}"],
            "tls_key_file",
        ),
        (NsSettings, ["--tls-cert-file", "{garbage}", "--tls-key-file", "{key}"], "tls_key_file"),
        (TaskServerSettings, [*TS_SECRETS, "--ns-ca-file", "{garbage}"], "ns_ca_file"),
        (TaskServerSettings, [*TS_SECRETS, "--ns-ca-file", "{missing}"], "ns_ca_file"),
        (AgentSettings, [SECRET, "--ca-file", "{garbage}"], "ca_file"),
    ],
)
def test_unusable_certificate_settings_stop_at_start_naming_the_setting(
    cls: type[NsSettings], flags: list[str], setting: str, tmp_path: Path
) -> None:
    ca = DevCa(tmp_path)
    cert, other = ca.issue("a", ["127.0.0.1"]), ca.issue("b", ["127.0.0.1"])
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    files = {
        "cert": cert.cert_file, "key": cert.key_file, "other_key": other.key_file,
        "garbage": garbage, "missing": tmp_path / "missing.pem",
    }  # fmt: skip
    args = [f.format(**files) for f in flags]
    with pytest.raises(ConfigError, match=f"setting {setting} "):
        load_settings(cls, [*args, "--state-dir", str(tmp_path)])


def test_is_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.9.8.7", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "ts.example", "", "127.example"]))


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stderr=subprocess.PIPE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


@pytest.mark.integration
@pytest.mark.attacks
@pytest.mark.timeout(60)
async def test_ns_serves_plain_http_on_all_addresses_only_when_allowed(tmp_path: Path) -> None:
    port = _free_port()
    argv = [
        sys.executable, "-m", "tickle", "ns", "--api-host", "0.0.0.0", "--api-port", str(port),
        "--state-dir", str(tmp_path / "ns"),
    ]  # fmt: skip
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode == 2
    assert "allow_plain_http" in refused.stderr
    assert not (tmp_path / "ns").exists()  # stopped before touching state, let alone binding
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))  # nothing took the port

    proc = _spawn([*argv, "--allow-plain-http"])
    try:
        end = time.monotonic() + 30
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientError:
                    assert proc.poll() is None, "the NS exited although allowed"
                    assert time.monotonic() < end, "the NS did not answer"
                    await asyncio.sleep(0.1)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    record(
        case="TLS: plain HTTP beyond loopback with allow_plain_http",
        done="tickle ns --api-host 0.0.0.0 without, then with --allow-plain-http",
        outcome="without: exit 2 before binding; with: serves plain HTTP",
        tried=2,
    )
