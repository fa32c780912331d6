"""Bad configuration stops each component with exit 2 and a message naming the setting, before it
binds anything: its ports are free right after and its state directory was never created."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.reliability import record

pytestmark = [pytest.mark.attacks, pytest.mark.integration]

_results: dict[str, list[str]] = {}


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Setup:
    """A component's otherwise good flags, and the ports (TCP, UDP) they would bind."""

    args: list[str]
    tcp: int | None
    udp: int | None

    def ports_free(self) -> bool:
        """Whether every port the component would have bound can be bound now (and freed)."""
        for kind, port in ((socket.SOCK_STREAM, self.tcp), (socket.SOCK_DGRAM, self.udp)):
            if port is not None:
                with socket.socket(socket.AF_INET, kind) as s:
                    try:
                        s.bind(("127.0.0.1", port))
                    except OSError:
                        return False
        return True


def setup_for(component: str, state: Path) -> Setup:
    tcp, udp = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)
    secret = "--enrollment-secret=" + "s" * 24
    if component == "ns":
        return Setup(["ns", "--api-host", "127.0.0.1", "--api-port", str(tcp), "--state-dir",
                      str(state), "--admin-token=" + "a" * 24, secret], tcp, None)  # fmt: skip
    if component == "task-server":
        return Setup(["task-server", "--name", "tsx", "--ns-url", "http://127.0.0.1:9", secret,
                      "--agent-enrollment-secret=" + "g" * 24, "--api-host", "127.0.0.1", "--api-port", str(tcp), "--tickle-host",
                      "127.0.0.1", "--tickle-port", str(udp), "--state-dir", str(state)],
                     tcp, udp)  # fmt: skip
    return Setup(["agent", "--name", "agx", "--task-servers", "http://127.0.0.1:9", secret,
                  "--tickle-host", "127.0.0.1", "--tickle-port", str(udp), "--state-dir",
                  str(state), "--metrics-host", "127.0.0.1", "--metrics-port", str(tcp)],
                 tcp, udp)  # fmt: skip


PREFIX = {"ns": "TICKLE_NS_", "task-server": "TICKLE_TS_", "agent": "TICKLE_AGENT_"}
# component -> (a port setting, a negative interval, a bad URL): flag, value, setting named
IMPOSSIBLE = {
    "ns": [("--api-port", "70000", "api_port"),
           ("--freshness-window-s", "-5", "freshness_window_s"),
           ("--database-url", "nosuchdb://x/y", "database_url")],
    "task-server": [("--tickle-port", "70000", "tickle_port"),
                    ("--ns-check-interval-s", "-1", "ns_check_interval_s"),
                    ("--ns-url", "not a url", "ns_url")],
    "agent": [("--tickle-port", "70000", "tickle_port"),
              ("--default-task-request-interval-s", "-60", "default_task_request_interval_s"),
              ("--task-servers", "ftp://ts.example", "task_servers")],
}  # fmt: skip
# a setting no flag above sets (a flag would win over the environment)
ENV = {"ns": "TICKLE_TRIES", "task-server": "FRESHNESS_WINDOW_S", "agent": "FRESHNESS_WINDOW_S"}


@dataclass
class Case:
    component: str
    label: str
    extra: list[str]
    toml: str | None
    env: dict[str, str]
    named: str  # the message must contain this


def cases() -> Iterator[Case]:
    for comp in ("ns", "task-server", "agent"):
        yield Case(comp, "broken TOML", [], "api_port = [1,\n", {}, "config")
        yield Case(comp, "unknown key in TOML", [], "bogus_key = 1\n", {}, "bogus_key")
        for flag, value, setting in IMPOSSIBLE[comp]:
            yield Case(comp, f"{flag} {value}", [f"{flag}={value}"], None, {}, setting)
        env = PREFIX[comp] + ENV[comp]
        yield Case(comp, f"env {env}=many", [], None, {env: "many"}, env)
    # the test-only clock offset outside a test (no TICKLE_TESTING=1): a shifted production clock
    yield Case("agent", "test clock offset outside tests", [], None,
               {"TICKLE_TEST_CLOCK_OFFSET_S": "60"}, "TICKLE_TESTING=1")  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _record_figures() -> Iterator[None]:
    yield
    for comp, outcomes in _results.items():
        bad = [o for o in outcomes if o != "ok"]
        record(
            case=f"Bad configuration: tickle {comp}",
            done="broken TOML, unknown key, port 70000, negative interval, bad URL, bad env var"
            + (", the test-only clock offset outside tests" if comp == "agent" else ""),
            outcome="exit 2 naming the setting, nothing bound, no state dir"
            if not bad
            else "; ".join(bad),
            tried=len(outcomes),
            command=f"pytest tests/attacks/test_config.py -k {comp}",
        )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(cases()), ids=lambda c: f"{c.component}: {c.label}")
def test_bad_setting_exits_2_naming_it_before_binding_anything(case: Case, tmp_path: Path) -> None:
    state = tmp_path / "state"
    setup = setup_for(case.component, state)
    args = [*setup.args, *case.extra]
    if case.toml is not None:
        config = tmp_path / "tickle.toml"
        config.write_text(case.toml)
        args += ["--config", str(config)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKLE_")}
    env.update(case.env)
    proc = subprocess.Popen([sys.executable, "-m", "tickle", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        _, err = proc.communicate(timeout=45)  # exits in ~1 s; a loaded CI machine took > 15
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        _results.setdefault(case.component, []).append(f"{case.label}: accepted, kept running")
        pytest.fail(f"{case.label} was accepted: the process kept running\n{err[-2000:]}")
    # right after the exit: the ports it would have used can be bound, its state dir never made
    ports_free = setup.ports_free()
    ok = (
        proc.returncode == 2
        and err.startswith(f"tickle {case.component}: ")
        and case.named in err
        and "Traceback" not in err
        and not state.exists()
        and ports_free
    )
    _results.setdefault(case.component, []).append(
        "ok" if ok else f"{case.label}: rc {proc.returncode}"
    )
    assert proc.returncode == 2, err
    assert err.startswith(f"tickle {case.component}: "), err
    assert case.named in err, err
    assert "Traceback" not in err, err
    assert not state.exists(), "the state directory was created before the config was checked"
    assert ports_free, "a port was still bound after the exit"


# --- a state directory others could write, or another user's: refused at start ----------------

UNSAFE_STATE = {"group-writable": 0o770, "world-writable": 0o777, "another user's": None}
_unsafe: dict[str, list[str]] = {}


@pytest.fixture(scope="module")
def unsafe_results() -> Iterator[dict[str, list[str]]]:
    yield _unsafe
    for comp, outcomes in _unsafe.items():
        bad = [o for o in outcomes if o != "ok"]
        record(
            case=f"Unsafe state directory: tickle {comp}",
            done="state_dir group-writable (0770), world-writable (0777), owned by another user",
            outcome="; ".join(bad) or "exit 2 naming the directory, nothing bound or written",
            tried=len(outcomes),
            command=f"pytest tests/attacks/test_config.py -k 'unsafe and {comp}-'",
        )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("unsafe", list(UNSAFE_STATE))
@pytest.mark.parametrize("component", ["ns", "task-server", "agent"])
def test_unsafe_state_dir_exits_2_naming_it_before_binding_anything(
    component: str, unsafe: str, tmp_path: Path, unsafe_results: dict[str, list[str]]
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    mode = UNSAFE_STATE[unsafe]
    if mode is None:
        if os.geteuid() != 0:
            pytest.skip("only root can give a directory to another user")
        os.chown(state, 65534, 65534)
        mode = 0o700
    state.chmod(mode)
    setup = setup_for(component, state)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKLE_")}
    proc = subprocess.run([sys.executable, "-m", "tickle", *setup.args], env=env, text=True,
                          capture_output=True, timeout=30, check=False)  # fmt: skip
    ports_free = setup.ports_free()
    ok = (
        proc.returncode == 2
        and proc.stderr.startswith(f"tickle {component}: setting state_dir: {state} ")
        and proc.stderr.count("\n") == 1
        and list(state.iterdir()) == []
        and state.stat().st_mode & 0o777 == mode
        and ports_free
    )
    unsafe_results.setdefault(component, []).append(
        "ok" if ok else f"{unsafe}: rc {proc.returncode}"
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"tickle {component}: setting state_dir: {state} "), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert list(state.iterdir()) == [], "files were written to a refused state directory"
    assert state.stat().st_mode & 0o777 == mode, "a refused state directory was changed"
    assert ports_free, "a port was still bound after the exit"
