"""How `make bench` takes a setting for its servers: on their command lines (`--ts-option`), never
from its own environment, which the fleet does not pass on (bench/run.py, `LocalFleet._env`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parent.parent / "bench" / "run.py"


@pytest.mark.parametrize("name", ["TICKLE_TS_PULLS_FIRST_S", "TICKLE_NS_MAX_CONNECTIONS"])
def test_a_server_setting_in_the_environment_is_refused_naming_it(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, "1")
    done = subprocess.run(
        [sys.executable, str(RUN), "--only", "pulls"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"run.py: error: {name} is not passed to the bench's servers: use --ts-option"
    assert "Traceback" not in done.stderr
