"""The console's browser tests: one LocalFleet per module, on its own loopback /24."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.console.chromium import missing
from tests.integration.conftest import NET_BASE
from tickle.testing.localfleet import AgentSpec, LocalFleet


@contextmanager
def running_fleet(
    root: Path, agents: list[AgentSpec], subnet: int, tls: bool = False
) -> Iterator[LocalFleet]:
    """A started fleet of one task server and `agents` on 127.X.`subnet`.0/24 (X: this pytest
    session's, as the integration tests choose it), stopped at the end."""
    assert not missing(), f"run `make sysdeps` to install {missing()}"
    # contacts reported every 0.5 s: the settings' reach moves while the browser looks
    fleet = LocalFleet(root, ["ts1"], agents, net=f"127.{NET_BASE}.{subnet}", tls=tls,
                       ts_extra=["--contact-report-interval-s", "0.5"])  # fmt: skip
    try:
        asyncio.run(fleet.start())
        yield fleet
    finally:
        asyncio.run(fleet.stop())
