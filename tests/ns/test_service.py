"""`tickle ns` as a process: configuration errors, start, clean stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.ns.conftest import free_port
from tickle.ns.service import main

LAUNCH = "import sys; from tickle.ns.service import main; sys.exit(main(sys.argv[1:]))"


def test_bad_port_in_environment_exits_2_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TICKLE_NS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TICKLE_NS_API_PORT", "abc")
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tickle ns: ")
    assert "api_port" in err
    assert "TICKLE_NS_API_PORT" in err
    assert not (tmp_path / "state").exists(), "stopped before touching anything"


def test_bad_toml_config_exits_2_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "ns.toml"
    config.write_text("api_port = [unclosed\n")
    monkeypatch.setenv("TICKLE_NS_STATE_DIR", str(tmp_path / "state"))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "config" in err
    assert str(config) in err


def test_bad_value_in_toml_config_exits_2_naming_the_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "ns.toml"
    config.write_text("tickle_tries = 0\n")
    monkeypatch.setenv("TICKLE_NS_STATE_DIR", str(tmp_path / "state"))
    assert main(["--config", str(config)]) == 2
    assert "tickle_tries" in capsys.readouterr().err


def test_bad_flag_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--state-dir", str(tmp_path), "--api-port", "70000"]) == 2
    assert "api_port" in capsys.readouterr().err


def test_unusable_database_url_exits_2_naming_the_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--state-dir", str(tmp_path), "--database-url", "nosuchdb://x/y"]) == 2
    assert "database_url" in capsys.readouterr().err


def test_database_other_than_sqlite_or_postgresql_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # SQLAlchemy knows MySQL, but the NS's migrations and dispatcher lock are for SQLite/PostgreSQL.
    assert main(["--state-dir", str(tmp_path), "--database-url", "mysql://u@db/tickle"]) == 2
    err = capsys.readouterr().err
    assert "database_url" in err
    assert "mysql" in err


def test_unreachable_database_says_so_in_one_line_without_its_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # nothing listens on port 1: the connection is refused when the NS migrates at start
    url = "postgresql+psycopg://tickle:s3cr3t-pw@127.0.0.1:1/tickle"
    assert main(["--state-dir", str(tmp_path), "--database-url", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        "tickle ns: database postgresql+psycopg://tickle:***@127.0.0.1:1/tickle: "
    )
    assert "s3cr3t-pw" not in err
    assert "sqlalche.me" not in err
    assert "Background on this error" not in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_ns_process_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "--api-port", str(port), "--state-dir", str(state)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, "NS exited during start"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "NS did not answer /health"
                time.sleep(0.1)
        token = (state / "admin-token").read_text().strip()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/settings", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}" in err
    assert str(state / "admin-token") in err
    assert (state / "ns.db").exists()
