"""The agent stays lean (S7 of issue 10): libraries it has no use for never enter its process.

aiohttp alone was a fifth of the agent's memory at rest; the agent's HTTP is h11's now
(tickle.agent.h11http). pydantic with pydantic-settings was 17 MB: the agent's settings and bodies
are msgspec's now (tickle.settingsbase, tickle.agentapi). The import contract in pyproject.toml forbids the import statically; these
check the process: what `tickle agent run` imports, and what a running agent has mapped.
"""

from __future__ import annotations

import _ssl
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import msgspec
import pydantic_core

from tickle.agent.settings import AgentSettings
from tickle.agent.state import AgentState
from tickle.agent.ts_client import TaskServerClient
from tickle.config import load_settings

from .agent_process import agent_process, first_pull
from .conftest import free_udp_port
from .fake_ts import FakeTaskServer

# what the agent must not load: the servers' stack, aiohttp with its parts, netlink (pyroute2),
# prometheus_client (until something reads its /metrics), pydantic with its parts (its settings
# and bodies are msgspec's: tickle.settingsbase, tickle.agentapi)
NOT_IN_THE_AGENT = (
    "aiohttp", "multidict", "yarl", "pyroute2", "prometheus_client", "fastapi", "starlette",
    "sqlalchemy", "uvicorn", "pydantic", "pydantic_core", "pydantic_settings",
)  # fmt: skip


def test_starting_the_agent_imports_no_aiohttp_nor_server_stack() -> None:
    # what `tickle agent run` imports before it starts the agent (tickle/__main__.py)
    code = (
        "import sys, tickle.__main__, tickle.agent.service\n"
        f"unwanted = {NOT_IN_THE_AGENT!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in unwanted))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"the agent imports {result.stdout}"


async def test_a_running_agent_has_not_loaded_aiohttp_nor_pydantic(
    fake_ts: FakeTaskServer, tmp_path: Path, short_dir: Path
) -> None:
    # aiohttp's compiled parser is mapped into any process that imports aiohttp, pydantic-core's
    # validator into any that imports pydantic
    compiled = list(Path(aiohttp.__file__).parent.glob("_http_parser*.so"))
    compiled += list(Path(pydantic_core.__file__).parent.glob("_pydantic_core*.so"))
    assert len(compiled) == 2, "a compiled part is missing: the check below would prove nothing"
    async with agent_process(
        fake_ts, tmp_path / "state", short_dir, "--tickle-host", "127.0.0.1",
        "--tickle-port", str(free_udp_port()),
    ) as agent:  # fmt: skip
        await first_pull(fake_ts, agent)
        # registered, pulled, and served a control call: every path of its HTTP has run
        status = await agent.control("GET", "/status")
        assert status["registered"] is True
        await agent.control("POST", "/check-now")
        maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
    loaded = {name for name in NOT_IN_THE_AGENT if f"/site-packages/{name}/" in maps}
    # nor ssl: it calls its task server over plain HTTP (tickle.agent.start); 1.4 MB at rest
    assert f"/{Path(_ssl.__file__).name}" not in maps, "a plain-HTTP agent has loaded ssl"
    assert f"/site-packages/{Path(msgspec.__file__).parent.name}/" in maps, "the check sees no .so"
    assert loaded == set(), f"the running agent has loaded {sorted(loaded)}"


async def test_only_an_agent_calling_https_builds_a_tls_context(tmp_path: Path) -> None:
    # the system trust store a default context loads is 2.5 MB: a plain-HTTP agent needs none
    contexts: dict[str, ssl.SSLContext | None] = {}
    for scheme in ("http", "https"):
        settings = load_settings(
            AgentSettings, [], name="pc1", task_servers=[f"{scheme}://127.0.0.1:1"],
            state_dir=tmp_path / scheme, enrollment_secret="s", allow_plain_http=True,
        )  # fmt: skip
        state = AgentState(settings.state_dir / "state.db")
        client = TaskServerClient(settings, state)
        await client.start()
        assert client._http_client is not None
        contexts[scheme] = client._http_client._ssl
        await client.close()
        state.close()
    assert contexts["http"] is None
    https = contexts["https"]
    assert https is not None
    assert https.verify_mode == ssl.CERT_REQUIRED
