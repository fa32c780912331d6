"""The agent's control socket: private from its creation, and nothing else in the process touched."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.conftest import StubAgent
from tickle.agent.control import ControlServer


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


async def test_control_sockets_started_together_leave_the_process_umask_alone(
    umask_022: None, short_dir: Path
) -> None:
    # several agents in one event loop (tests, simulators): a umask changed around an await
    # would be restored out of order and stay 0o177, so later directories lose their x bit
    servers = [ControlServer(StubAgent(), short_dir / f"a{i}.sock") for i in range(4)]
    await asyncio.gather(*(s.start() for s in servers))
    try:
        assert _umask() == 0o022
        for i in range(4):
            mode = stat.S_IMODE((short_dir / f"a{i}.sock").stat().st_mode)
            assert mode == 0o600
    finally:
        await asyncio.gather(*(s.close() for s in servers))
