"""`tickle agent run`: the agent's settings are read first, then the agent starts.

Read before anything else is imported, the settings say whether the agent calls any task server
over HTTPS. When none does, the agent runs without the `ssl` module: asyncio takes it as a Python
built without it, and the agent saves its 1.4 MB at rest (S7 of issue 10).
"""

from __future__ import annotations

import sys

from tickle.agent.settings import AgentSettings
from tickle.settingsbase import ConfigError, check_config, load_settings


def read_settings(args: list[str]) -> AgentSettings | int:
    """The agent's settings from its flags, environment and config file; else the exit code
    (`--check-config` answered, or 2 after a configuration error printed on one line)."""
    checked = check_config("agent", AgentSettings, args)
    if checked is not None:
        return checked
    try:
        return load_settings(AgentSettings, args)
    except ConfigError as exc:
        print(f"tickle agent: {exc}", file=sys.stderr)
        return 2


def needs_tls(settings: AgentSettings) -> bool:
    """Whether the agent calls a task server (or its gateway) over HTTPS."""
    return any(url.lower().startswith("https:") for url in settings.api_urls)


def main(args: list[str]) -> int:
    """Run the agent until SIGTERM/SIGINT (the process's entry: `tickle agent run`)."""
    settings = read_settings(args)
    if isinstance(settings, int):
        return settings
    if not needs_tls(settings) and "ssl" not in sys.modules:
        sys.modules["ssl"] = None  # type: ignore[assignment]  # `import ssl` fails: none is used
    from tickle.agent.service import run

    return run(settings)
