"""Settings, registration and the address the agent reports."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tickle.agent import address
from tickle.agent.control import control_call
from tickle.agent.service import main
from tickle.agent.settings import AgentSettings
from tickle.agent.state import AgentState
from tickle.agent.ts_client import NotRegistered, TaskServerClient
from tickle.config import ConfigError, load_settings

from .conftest import free_udp_port, running_agent
from .fake_ts import FakeTaskServer


def test_agent_imports_no_server_stack() -> None:
    code = (
        "import sys, tickle.agent.service, tickle.agent.control\n"
        "bad = [m for m in ('fastapi', 'sqlalchemy', 'uvicorn') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_missing_enrollment_secret_exits_2_naming_the_setting_before_binding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TICKLE_AGENT_ENROLLMENT_SECRET", raising=False)
    monkeypatch.delenv("TICKLE_AGENT_CONFIG", raising=False)
    port = free_udp_port()
    state_dir = tmp_path / "state"
    rc = main(["--tickle-host", "127.0.0.1", "--tickle-port", str(port),
               "--state-dir", str(state_dir)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("tickle agent: ")
    assert "enrollment_secret" in err
    assert "TICKLE_AGENT_ENROLLMENT_SECRET" in err
    assert not state_dir.exists()  # nothing created, nothing bound
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))


def test_task_servers_from_environment_as_json_or_comma_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TICKLE_AGENT_ENROLLMENT_SECRET", "s")
    monkeypatch.setenv("TICKLE_AGENT_TASK_SERVERS", "https://ts1:50121, https://ts2:50121/")
    monkeypatch.setenv("TICKLE_AGENT_GROUPS", "web,db")
    settings = load_settings(AgentSettings, [])
    assert settings.task_servers == ["https://ts1:50121", "https://ts2:50121"]
    assert settings.groups == ["web", "db"]
    monkeypatch.setenv("TICKLE_AGENT_TASK_SERVERS", '["https://ts3:1"]')
    assert load_settings(AgentSettings, []).task_servers == ["https://ts3:1"]
    monkeypatch.setenv("TICKLE_AGENT_TASK_SERVERS", "ftp://nope")
    with pytest.raises(ConfigError, match="task_servers"):
        load_settings(AgentSettings, [])


def test_control_socket_defaults_into_state_dir(tmp_path: Path) -> None:
    settings = load_settings(AgentSettings, [], enrollment_secret="s", state_dir=tmp_path)
    assert settings.socket_path == tmp_path / "agent.sock"


async def test_registration_falls_over_to_the_next_task_server(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    settings = settings_for(fake_ts, task_servers=["http://127.0.0.1:9", fake_ts.url])
    async with running_agent(settings) as agent:
        assert agent.status()["task_server_url"] == fake_ts.url
    assert len(fake_ts.registrations) == 1


async def test_agent_registers_again_when_its_token_is_refused(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    settings = settings_for(fake_ts)
    async with running_agent(settings):
        fake_ts.revoke_tokens()
        since = time.time()
        answer = await control_call(settings.socket_path, "POST", "/check-now")
    assert answer["via"] == "check_now"
    assert fake_ts.routes(since=since) == ["tasks", "register", "tasks"]
    assert len(fake_ts.registrations) == 2


async def test_credentials_survive_a_restart_without_registering_again(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    settings = settings_for(fake_ts)
    async with running_agent(settings):
        pass
    async with running_agent(settings):
        pass
    assert len(fake_ts.registrations) == 1


async def test_every_registration_brings_the_identity_made_once_in_the_agents_state(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    settings = settings_for(fake_ts)
    async with running_agent(settings):
        fake_ts.revoke_tokens()  # the next call registers again
        await control_call(settings.socket_path, "POST", "/check-now")
    fake_ts.revoke_tokens()
    async with running_agent(settings):  # restarted: registers again (the token is refused)
        await control_call(settings.socket_path, "POST", "/check-now")
    identities = [r.identity for r in fake_ts.registrations]
    assert len(identities) == 3
    assert identities[0] is not None
    assert len(set(identities)) == 1  # the NS sees one agent throughout


async def test_loopback_agent_reports_and_uses_its_own_address(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    settings = settings_for(
        fake_ts, tickle_host="127.0.0.7", tickle_port=free_udp_port("127.0.0.7")
    )
    async with running_agent(settings):
        pass
    reg = fake_ts.registrations[0]
    assert (reg.reported_address, reg.tickle_host, reg.groups) == ("127.0.0.7", "127.0.0.7", [])
    # the HTTP client binds the tickle address: the task server sees no false NAT
    assert {c.peer for c in fake_ts.calls} == {"127.0.0.7"}


async def test_wildcard_agent_reports_the_routing_table_source_address(
    fake_ts: FakeTaskServer, settings_for: Callable[..., AgentSettings]
) -> None:
    settings = settings_for(fake_ts, tickle_host="0.0.0.0", groups=["lab"])
    async with running_agent(settings):
        pass
    reg = fake_ts.registrations[0]
    assert reg.reported_address == "127.0.0.1"
    assert reg.groups == ["lab"]


@pytest.mark.parametrize("dst", ["127.0.0.9", "192.0.2.1"])
async def test_route_source_is_the_source_address_of_the_kernels_route(dst: str) -> None:
    # what `ip route get` says (iproute2 reads the kernel's answer over netlink); nothing is sent
    route = subprocess.run(["ip", "route", "get", dst], capture_output=True, text=True, check=True)
    words = route.stdout.split()
    assert await address.route_source(dst) == words[words.index("src") + 1]


async def test_a_task_server_answering_with_a_redirect_is_refused_not_followed(
    tmp_path: Path,
) -> None:
    # the agent's client follows no redirect (its token must not go where a proxy points): a
    # 3xx is a refusal like a 4xx, never an answer to parse
    from aiohttp import web

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect("http://127.0.0.1:1/elsewhere")

    app = web.Application()
    app.router.add_post("/api/agent/register", moved)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    settings = load_settings(
        AgentSettings, [], name="pc1", task_servers=[url], state_dir=tmp_path / "agent",
        enrollment_secret="s", tickle_host="127.0.0.1",
    )  # fmt: skip
    state = AgentState(settings.state_dir / "agent.db")
    client = TaskServerClient(settings, state)
    await client.start()
    try:
        with pytest.raises(NotRegistered, match="HTTP 307"):
            await client.register()
    finally:
        await client.close()
        state.close()
        await runner.cleanup()
