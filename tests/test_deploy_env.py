"""The Ansible controller: requirements-deploy.txt (the supported range), constraints-deploy.txt
(the versions tested) and the roles' min_ansible_version agree; a controller Python older than
3.12 is refused with a message that names it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
ROLES = sorted(p.parent.parent for p in (ROOT / "roles").glob("*/meta/main.yml"))
# The maintained ansible-core releases (2.19 reached its end of life on 2026-11-30).
SUPPORTED = ("2.20", "2.21")


def _lines(name: str) -> list[str]:
    text = (ROOT / name).read_text()
    return [line for line in (raw.split("#", 1)[0].strip() for raw in text.splitlines()) if line]


def _requirements() -> dict[str, Requirement]:
    return {(r := Requirement(line)).name: r for line in _lines("requirements-deploy.txt")}


def _pins() -> dict[str, Version]:
    pins = {}
    for line in _lines("constraints-deploy.txt"):
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([0-9][0-9A-Za-z.]*)", line)
        assert match, f"constraints-deploy.txt: {line!r} is not an exact pin NAME==VERSION"
        pins[match[1]] = Version(match[2])
    return pins


def _core_range() -> SpecifierSet:
    return _requirements()["ansible-core"].specifier


def test_the_supported_ansible_core_releases_are_the_maintained_ones() -> None:
    admitted = {f"2.{minor}" for minor in range(10, 30) if Version(f"2.{minor}.0") in _core_range()}
    assert admitted == set(SUPPORTED)


def test_every_requirement_is_pinned_inside_its_range() -> None:
    pins = _pins()
    for name, requirement in _requirements().items():
        assert name in pins, f"{name} is in requirements-deploy.txt but not pinned"
        assert pins[name] in requirement.specifier, f"{name}=={pins[name]} outside {requirement}"


def test_the_tested_ansible_core_is_the_newest_supported_release() -> None:
    tested = _pins()["ansible-core"]
    assert f"{tested.major}.{tested.minor}" == SUPPORTED[-1]


def test_the_collections_come_from_the_ansible_package_of_that_core() -> None:
    # ansible N is built on ansible-core 2.(N+7): 11 on 2.18, 13 on 2.20, 14 on 2.21
    pins = _pins()
    assert pins["ansible"].major + 7 == pins["ansible-core"].minor
    assert "ansible" not in _requirements()  # only its collections are used, offline


def test_the_roles_declare_the_oldest_supported_release() -> None:
    assert len(ROLES) >= 7
    for role in ROLES:
        meta = yaml.safe_load((role / "meta" / "main.yml").read_text())
        assert meta["galaxy_info"]["min_ansible_version"] == SUPPORTED[0], role.name


def test_the_playbooks_check_the_controller_for_the_same_release() -> None:
    play = yaml.safe_load((ROOT / "playbooks" / "controller.yml").read_text())[0]
    assert play["tasks"][0]["ansible.builtin.assert"]["that"] == (
        f"ansible_version.full is version('{SUPPORTED[0]}', '>=')"
    )
    facts = yaml.safe_load((ROOT / "playbooks" / "facts.yml").read_text())
    assert facts[0] == {
        "name": "The Ansible controller",
        "ansible.builtin.import_playbook": "controller.yml",
    }


def _only_on_path(tmp_path: Path, python: str) -> dict[str, str]:
    """An environment whose PATH holds the shell tools and `python3` -> python, nothing else."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "cat", "cut", "dirname", "sed", "sha256sum", "rm"):
        found = subprocess.run(["bash", "-c", f"command -v {tool}"], capture_output=True, text=True)
        (bin_dir / tool).symlink_to(found.stdout.strip())
    (bin_dir / "python3").symlink_to(python)
    return {"PATH": str(bin_dir), "HOME": str(tmp_path)}


def test_find_python_names_the_minimum_and_what_it_found(tmp_path: Path) -> None:
    env = _only_on_path(tmp_path, sys.executable)
    script = str(ROOT / "scripts" / "find-python.sh")
    ok = subprocess.run(["bash", script, "3.12"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(tmp_path / "bin" / "python3")
    refused = subprocess.run(["bash", script, "3.99"], env=env, capture_output=True, text=True)
    version = ".".join(map(str, sys.version_info[:3]))
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr.startswith(f"find-python: Python >= 3.99 is needed, found only {version}")
    assert len(refused.stderr.splitlines()) == 1


def _old_python() -> str:
    """A Python older than 3.12 on this machine (Debian 12's own, or one of pyenv's)."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [Path("/usr/bin/python3.11"), *sorted(pyenv.glob("3.1[01].*/bin/python3"))]
    found = [str(p) for p in candidates if p.exists()]
    assert found, "no Python older than 3.12 here to play an old controller"
    return found[0]


def test_deploy_venv_refuses_a_controller_python_older_than_3_12(tmp_path: Path) -> None:
    env = _only_on_path(tmp_path, _old_python())
    env["DEPLOY_VENV"] = str(tmp_path / "venv")
    script = str(ROOT / "scripts" / "testbed" / "deploy-venv.sh")
    run = subprocess.run(["bash", script], env=env, capture_output=True, text=True)
    assert run.returncode == 1
    assert "find-python: Python >= 3.12 is needed, found only 3.1" in run.stderr
    assert "the Ansible controller needs Python >= 3.12" in run.stderr
    assert not (tmp_path / "venv").exists()
