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
    # the headline first; after it, checks of the scenario's own (upgrade_NAME.py, operator_NAME.py)
    assert extra[:1] == [f"headline_{scenario}.py"], f"{scenario}: verifier runs {extra}"
    own = {f"upgrade_{scenario}.py", f"operator_{scenario}.py"}
    assert set(extra[1:]) <= own, f"{scenario}: verifier runs {extra}"
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


# --- the rolling upgrade: one scenario converges the previous release, then upgrades it ----------

ROOT = MOLECULE.parent
PREVIOUS_RELEASE = ROOT / "scripts" / "testbed" / "previous-release"


def _previous() -> dict[str, str]:
    lines = PREVIOUS_RELEASE.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def _upgrading_scenarios() -> list[str]:
    return [
        s for s in SCENARIOS if "build/previous/" in (MOLECULE / s / "molecule.yml").read_text()
    ]


def test_one_scenario_deploys_the_previous_release_and_upgrades_it_under_load() -> None:
    assert _upgrading_scenarios() == ["tickle_delivery"]
    config = yaml.safe_load((MOLECULE / "tickle_delivery" / "molecule.yml").read_text())
    playbooks = config["provisioner"]["playbooks"]
    # the previous release's own site.yml (and so its own roles, playbooks/roles beside it)
    assert playbooks["converge"] == "../../build/previous/tree/playbooks/site.yml"
    assert playbooks["side_effect"] == "../shared/upgrade.yml"
    side_effect = yaml.safe_load((MOLECULE / "shared" / "upgrade.yml").read_text())
    imported = [play.get("ansible.builtin.import_playbook") for play in side_effect]
    assert imported == [None, "../../playbooks/upgrade.yml", None], imported
    sequence = config["scenario"]["test_sequence"]
    # Molecule's idempotence step would converge the previous release again, over the upgrade;
    # the verify step runs upgrade.yml again instead and wants it to change nothing
    assert "idempotence" not in sequence
    assert sequence.index("converge") < sequence.index("side_effect") < sequence.index("verify")
    assert "upgrade_tickle_delivery.py" in config["verifier"]["additional_files_or_dirs"]
    source = (MOLECULE / "tests" / "upgrade_tickle_delivery.py").read_text()
    assert "def test_upgrade_again_changes_nothing" in source


def test_the_previous_release_is_an_older_version_in_this_history() -> None:
    import subprocess

    from packaging.version import Version

    import tickle

    previous = _previous()
    assert re.fullmatch(r"[0-9a-f]{40}", previous["commit"]), previous
    pyproject = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{previous['commit']}:pyproject.toml"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert pyproject.returncode == 0, f"commit {previous['commit']}: {pyproject.stderr.strip()}"
    assert f'version = "{previous["version"]}"' in pyproject.stdout
    assert Version(previous["version"]) < Version(tickle.__version__)


def test_previous_release_not_in_the_clone_is_one_clear_line(tmp_path: Path) -> None:
    import os
    import subprocess

    release = tmp_path / "previous-release"
    release.write_text("version=0.0.1\ncommit=" + "0" * 40 + "\n")
    done = subprocess.run(
        [str(ROOT / "scripts" / "testbed" / "previous.sh")],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "PREVIOUS_RELEASE_FILE": str(release)},
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("[testbed] error: the previous release 0.0.1 (commit 000"), lines
    assert "not in this clone" in lines[-1]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("jobs", ["two", "0", "-1", "1.5"])
def test_molecule_jobs_not_a_count_is_one_clear_line_before_any_build(
    tmp_path: Path, jobs: str
) -> None:
    import os
    import subprocess

    done = subprocess.run(
        [str(ROOT / "scripts" / "testbed" / "molecule.sh"), "cem_mode"],
        capture_output=True, text=True, check=False, timeout=60,
        env={**os.environ, "MOLECULE_JOBS": jobs, "TESTBED_BUILD": str(tmp_path / "build")},
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"[testbed] error: MOLECULE_JOBS must be a whole number of at least 1, not '{jobs}'"
    ], done.stderr
    assert not (tmp_path / "build").exists()
