"""The Molecule scenarios' own checks are built so they can fail: each scenario runs a headline
module of its own that never skips, and the fleet helpers never read an absent metric as 0."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

MOLECULE = Path(__file__).resolve().parent.parent / "molecule"
SCENARIOS = sorted(
    p.parent.name for p in MOLECULE.glob("*/molecule.yml") if p.parent.name != "default"
)


def _fleet_module() -> ModuleType:
    name = "molecule_fleet"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, MOLECULE / "tests" / "fleet.py")
        assert spec
        assert spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_the_three_scenarios_exist() -> None:
    assert SCENARIOS == ["blocked_tickle_polling", "cem_mode", "tickle_delivery"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_scenario_runs_its_own_headline_module(scenario: str) -> None:
    config = yaml.safe_load((MOLECULE / scenario / "molecule.yml").read_text())
    extra = config.get("verifier", {}).get("additional_files_or_dirs", [])
    # the headline first; after it, checks of the scenario's own (operator_NAME.py)
    assert extra[:1] == [f"headline_{scenario}.py"], f"{scenario}: verifier runs {extra}"
    assert set(extra[1:]) <= {f"operator_{scenario}.py"}, f"{scenario}: verifier runs {extra}"
    for name in extra:
        assert (MOLECULE / "tests" / name).is_file(), name


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_headline_modules_never_skip(scenario: str) -> None:
    source = (MOLECULE / "tests" / f"headline_{scenario}.py").read_text()
    code = "\n".join(line.split("#", 1)[0] for line in source.splitlines())
    found = re.findall(r"\b(?:pytest\.skip|skipif|mark\.skip|xfail|importorskip)\b", code)
    assert not found, f"headline_{scenario}.py may skip: {found}"
    assert re.search(r"^def test_", source, re.M), f"headline_{scenario}.py has no test"


def test_headline_modules_are_not_collected_by_the_shared_walk() -> None:
    # Molecule collects test_*.py under molecule/tests for every scenario: a headline must not be one.
    assert not list((MOLECULE / "tests").glob("test_headline*.py"))


def test_metric_sums_the_matching_samples() -> None:
    fleet = _fleet_module()
    text = (
        "# TYPE tickle_tickles_sent_total counter\n"
        'tickle_tickles_sent_total{kind="tasks"} 3.0\n'
        'tickle_tickles_sent_total{kind="settings"} 2.0\n'
        "tickle_tickles_skipped_cem_total 0.0\n"
    )
    assert fleet.metric(text, "tickle_tickles_sent_total") == 5.0
    assert fleet.metric(text, "tickle_tickles_sent_total", kind="tasks") == 3.0
    assert fleet.metric(text, "tickle_tickles_skipped_cem_total") == 0.0


def test_metric_not_exposed_is_an_error_not_zero() -> None:
    fleet = _fleet_module()
    text = 'tickle_tickles_sent_total{kind="tasks"} 3.0\n'
    with pytest.raises(AssertionError, match="tickle_tickles_renamed_total"):
        fleet.metric(text, "tickle_tickles_renamed_total")
    with pytest.raises(AssertionError, match='kind="policy"'):
        fleet.metric(text, "tickle_tickles_sent_total", kind="policy")
