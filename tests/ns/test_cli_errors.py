"""A request the NS refuses with a 422 is one plain line at the terminal: the field and what is
wrong, without pydantic's wording, its documentation links or a Python repr of the error list."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from tests.ns.conftest import ADMIN, Ns


@pytest.mark.integration
@pytest.mark.timeout(60)
async def test_a_value_the_ns_refuses_is_one_plain_line(ns: Ns) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TICKLE_")}
    argv = [sys.executable, "-m", "tickle", "--ns-url", ns.url, "--admin-token", ADMIN,
            "runs", "list", "--before", str(2**70)]  # fmt: skip

    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)

    text = stderr.decode()
    assert proc.returncode == 1, text
    assert stdout == b""
    assert text.startswith("tickle: GET /api/runs: HTTP 422: before: must be at most "), text
    assert text.count("\n") == 1, text
    for internal in ("pydantic", "errors.pydantic.dev", "Input should", "{'", "'loc'"):
        assert internal not in text, text
