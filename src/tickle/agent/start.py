"""`tickle agent run`: the agent's settings are read first, then the agent starts.

Read before anything else is imported, the settings say whether the agent calls any task server
over HTTPS. When none does, asyncio and the agent's modules are imported without the `ssl` module
(asyncio takes it as a Python built without it): the agent at rest is 1.1 MB smaller (S7 of issue
10). A library imported later that wants ssl (prometheus_client, by the first /metrics scrape)
loads it as usual.
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


def main(args: list[str]) -> int:
    """Run the agent until SIGTERM/SIGINT (the process's entry: `tickle agent run`)."""
    settings = read_settings(args)
    if isinstance(settings, int):
        return settings
    without_ssl = not settings.calls_https and "ssl" not in sys.modules
    if without_ssl:  # `import ssl` fails while asyncio and the agent's modules are imported
        sys.modules["ssl"] = None  # type: ignore[assignment]
    try:
        from tickle.agent.service import run
    finally:
        if without_ssl:  # a later import loads it (prometheus_client's, by a /metrics scrape)
            del sys.modules["ssl"]
    return run(settings)
