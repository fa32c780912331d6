"""The import rules: the contracts `make lint` checks cover every module, and the CLI stays thin."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import tickle

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ("tickle.ns", "tickle.taskserver", "tickle.agent")


def test_every_top_level_module_of_tickle_is_named_by_an_import_contract() -> None:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    named = {
        name
        for contract in contracts["contracts"]
        for field in ("modules", "source_modules", "forbidden_modules")
        for name in contract.get(field, [])
    }
    modules = {f"tickle.{m.name}" for m in pkgutil.iter_modules(tickle.__path__)}
    assert modules - named == set(), (
        "add each to the [tool.importlinter] contracts in pyproject.toml: a shared module to the "
        "sources of 'Shared modules import no component...'"
    )


def test_importing_the_cli_loads_no_component_nor_the_server_stack() -> None:
    # a component is imported only when its subcommand runs: `tickle agent` on an agent-only host
    unwanted = (*COMPONENTS, "tickle.testing", "fastapi", "sqlalchemy", "uvicorn")
    code = (
        "import sys, tickle.cli\n"
        f"unwanted = {unwanted!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in unwanted"
        " or '.'.join(m.split('.')[:2]) in unwanted))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"`import tickle.cli` loaded {result.stdout}"
