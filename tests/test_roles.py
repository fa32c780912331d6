"""The roles document every variable: each one in defaults/main.yml has a comment there and an
entry in meta/argument_specs.yml (type, description, the same default, choices that admit it), and
carries the role's name as its prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROLES = Path(__file__).resolve().parent.parent / "roles"
ROLE_NAMES = sorted(p.name for p in ROLES.iterdir() if (p / "defaults" / "main.yml").exists())
TYPES = {"str": str, "bool": bool, "int": int, "float": (int, float), "list": list, "dict": dict}


def _defaults(role: str) -> dict[str, Any]:
    return yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {}


def _options(role: str) -> dict[str, dict[str, Any]]:
    specs = yaml.safe_load((ROLES / role / "meta" / "argument_specs.yml").read_text())
    return dict(specs["argument_specs"]["main"]["options"])


def test_there_are_roles() -> None:
    assert {"tickle_notification_server", "tickle_task_server", "tickle_client_task_agent",
            "tickle_firewall", "tickle_install"} <= set(ROLE_NAMES)  # fmt: skip


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_every_default_is_in_the_argument_specs_and_back(role: str) -> None:
    defaults, options = set(_defaults(role)), set(_options(role))
    assert defaults - options == set(), f"{role}: in defaults/main.yml, not in argument_specs.yml"
    assert options - defaults == set(), f"{role}: in argument_specs.yml, not in defaults/main.yml"


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_every_variable_carries_the_role_prefix(role: str) -> None:
    stray = [name for name in _defaults(role) if not name.startswith(role + "_")]
    assert stray == [], f"{role}: variables without the prefix {role}_"


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_every_default_has_a_comment(role: str) -> None:
    lines = (ROLES / role / "defaults" / "main.yml").read_text().splitlines()
    bare = [line.split(":")[0] for i, line in enumerate(lines)
            if line and not line[0].isspace() and not line.startswith(("#", "---"))
            and not lines[i - 1].startswith("#")]  # fmt: skip
    assert bare == [], f"{role}: defaults without a comment line above them"


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_argument_specs_give_type_description_and_the_same_default(role: str) -> None:
    defaults = _defaults(role)
    for name, option in _options(role).items():
        assert option.get("description"), f"{role}: {name} has no description"
        kind = option.get("type")
        assert kind in {*TYPES, "path", "raw"}, f"{role}: {name} has type {kind!r}"
        value = defaults.get(name)
        if isinstance(value, str) and "{{" in value:
            continue  # computed on the controller; the spec says in words what it is
        assert option.get("default") == value, f"{role}: {name} defaults differ"
        if kind in TYPES:
            assert isinstance(value, TYPES[kind]), f"{role}: {name} is not a {kind}"
        choices = option.get("choices")
        if choices is not None:
            picked = value if isinstance(value, list) else [value]
            assert set(picked) <= set(choices), f"{role}: {name} default outside its choices"
