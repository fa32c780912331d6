"""The roles document every variable: each one in defaults/main.yml has a comment there and an
entry in meta/argument_specs.yml (type, description, the same default, choices that admit it), and
carries the role's name as its prefix. A default computed on the controller (a template) stands in
the argument spec as the very same template, marked !unsafe so the role's argument validation does
not evaluate it (a lookup there would generate a secret the operator supplies)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROLES = Path(__file__).resolve().parent.parent / "roles"
ROLE_NAMES = sorted(p.name for p in ROLES.iterdir() if (p / "defaults" / "main.yml").exists())
TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str,
    "bool": bool,
    "int": int,
    "float": (int, float),
    "list": list,
    "dict": dict,
}


class Unsafe(str):
    """A string tagged !unsafe: Ansible never templates it."""


class _SpecLoader(yaml.SafeLoader):
    """Reads argument specs as Ansible does, keeping the !unsafe mark."""


_SpecLoader.add_constructor(
    "!unsafe",
    lambda loader, node: Unsafe(loader.construct_scalar(node)),
)


def _templated(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def _defaults(role: str) -> dict[str, Any]:
    return yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()) or {}


def _entry_points(role: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Options of each entry point (main, or the tasks_from files of a shared role)."""
    text = (ROLES / role / "meta" / "argument_specs.yml").read_text()
    specs = yaml.load(text, Loader=_SpecLoader)["argument_specs"]
    return {entry: dict(spec.get("options") or {}) for entry, spec in specs.items()}


def _options(role: str) -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = {}
    for entry_options in _entry_points(role).values():
        for name, option in entry_options.items():
            assert options.setdefault(name, option) == option, (
                f"{role}: {name} differs by entry point"
            )
    return options


def test_there_are_roles() -> None:
    assert {"tickle_notification_server", "tickle_task_server", "tickle_client_task_agent",
            "tickle_firewall", "tickle_install", "tickle_certificate", "tickle_service"} <= set(ROLE_NAMES)  # fmt: skip


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
    problems = [f"{name}: {problem}" for name, option in _options(role).items()
                for problem in _spec_problems(option, defaults.get(name))]  # fmt: skip
    assert problems == [], f"{role}, meta/argument_specs.yml:\n" + "\n".join(problems)


def _spec_problems(option: dict[str, Any], value: Any) -> list[str]:
    """What an option's spec gets wrong about its default in defaults/main.yml."""
    problems = []
    if not option.get("description"):
        problems.append("no description")
    kind = option.get("type")
    if kind not in {*TYPES, "path", "raw"}:
        problems.append(f"type {kind!r}")
    # Templated or not, the spec shows the default exactly as defaults/main.yml has it.
    if option.get("default") != value:
        problems.append(f"default {option.get('default')!r}, defaults/main.yml has {value!r}")
    if _templated(value):
        if not isinstance(option.get("default"), Unsafe):
            problems.append("a templated default needs !unsafe (the validation would evaluate it)")
        return problems  # its type and choices are the rendered value's, on the controller
    if kind in TYPES and not isinstance(value, TYPES[kind]):
        problems.append(f"default {value!r} is not a {kind}")
    choices = option.get("choices")
    picked = value if isinstance(value, list) else [value]
    if choices is not None and not set(picked) <= set(choices):
        problems.append(f"default {value!r} outside the choices {choices}")
    return problems


def _tasks(node: Any) -> list[dict[str, Any]]:
    """Every task in a task file, blocks and handlers included."""
    found = []
    for task in node or []:
        found.append(task)
        for key in ("block", "rescue", "always"):
            found += _tasks(task.get(key))
    return found


def _as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, str) else list(value)


def _notified(task: dict[str, Any]) -> list[str]:
    names = _as_list(task.get("notify", []))
    # What a role passes a shared role (tickle_install_notify, tickle_service_notify, ...).
    for key, value in (task.get("vars") or {}).items():
        if key.endswith("_notify"):
            names += value
    return [name for name in names if not _templated(name)]


@pytest.mark.parametrize("role", ROLE_NAMES)
def test_every_notified_handler_listens_in_the_role(role: str) -> None:
    handlers_file = ROLES / role / "handlers" / "main.yml"
    handlers = _tasks(yaml.safe_load(handlers_file.read_text())) if handlers_file.exists() else []
    assert all(h.get("listen") for h in handlers), f"{role}: a handler without listen:"
    topics = {h["name"] for h in handlers} | {t for h in handlers for t in _as_list(h["listen"])}
    notified = {name for path in sorted((ROLES / role / "tasks").glob("*.yml"))
                for task in _tasks(yaml.safe_load(path.read_text())) for name in _notified(task)}  # fmt: skip
    assert notified <= topics, f"{role}: notifies {sorted(notified - topics)}, no handler listens"


STATEFUL_UNITS = sorted(
    p for p in ROLES.glob("*/templates/*.service.j2") if "\nStateDirectory=" in p.read_text()
)


def test_the_three_components_have_state_directories() -> None:
    assert len(STATEFUL_UNITS) == 3, STATEFUL_UNITS


@pytest.mark.parametrize("unit", STATEFUL_UNITS, ids=lambda p: p.name)
def test_every_unit_with_a_state_directory_keeps_it_private(unit: Path) -> None:
    # the component refuses a state directory others can write and tightens one others can read
    # at every start; the unit must agree, or systemd and the component fight over the mode
    lines = unit.read_text().splitlines()
    assert "StateDirectoryMode=0700" in lines
    assert "UMask=0077" in lines


COMPONENTS = {
    "tickle_notification_server": ("notification-server.toml.j2", {"admin_token", "enrollment_secret", "database_url"}),
    "tickle_task_server": ("task-server.toml.j2", {"enrollment_secret", "agent_enrollment_secret"}),
    "tickle_client_task_agent": ("client-task-agent.toml.j2", {"enrollment_secret"}),
}  # fmt: skip
SECRETS = {"admin_token", "enrollment_secret", "database_url"}  # its password


def _yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_SpecLoader)


def _template_keys(role: str) -> set[str]:
    template = ROLES / role / "templates" / COMPONENTS[role][0]
    return set(re.findall(r"(?m)^([a-z_]+) = ", template.read_text()))


@pytest.mark.parametrize("role", sorted(COMPONENTS))
def test_config_templates_hold_no_secret_and_name_the_secrets_file(role: str) -> None:
    # the configuration is shown by --diff (not no_log): the secrets go to a file of their own
    keys = _template_keys(role)
    assert keys & SECRETS == set(), f"{role}: secrets in the configuration template"
    assert "secrets_file" in keys
    configure = _yaml(ROLES / role / "tasks" / "configure.yml")
    service = next(t for t in configure if t.get("ansible.builtin.include_role", {}).get("tasks_from") == "configure")  # fmt: skip
    secrets = service["vars"]["tickle_service_secrets"]
    assert all(name in secrets for name in COMPONENTS[role][1]), secrets


def test_only_the_secrets_file_is_no_log() -> None:
    tasks = {t["name"]: t for t in _tasks(_yaml(ROLES / "tickle_service" / "tasks" / "configure.yml"))}  # fmt: skip
    assert tasks["Write the secret settings"].get("no_log") is True
    assert "no_log" not in tasks["Write the configuration"]


@pytest.mark.parametrize("role", sorted(COMPONENTS))
def test_every_config_is_checked_by_the_component_before_it_is_written(role: str) -> None:
    tasks = {t["name"]: t for t in _tasks(_yaml(ROLES / "tickle_service" / "tasks" / "configure.yml"))}  # fmt: skip
    assert "tickle_service_config_check" in tasks["Write the configuration"]["ansible.builtin.template"]["validate"]  # fmt: skip
    configure = _yaml(ROLES / role / "tasks" / "configure.yml")
    service = next(t for t in configure if t.get("ansible.builtin.include_role", {}).get("tasks_from") == "configure")  # fmt: skip
    check = service["vars"]["tickle_service_config_check"]
    assert check[-1] == "--check-config", check
    assert check[-2] in {"ns", "task-server", "agent"}, check
    # the certificate the configuration names is installed before the configuration is checked
    names = [t.get("ansible.builtin.include_role", {}).get("name") for t in configure]
    if "tickle_certificate" in names:
        assert names.index("tickle_certificate") < names.index("tickle_service"), names


@pytest.mark.parametrize("role", sorted(COMPONENTS))
def test_extra_config_may_not_repeat_a_built_in_setting(role: str) -> None:
    builtin = set(_yaml(ROLES / role / "vars" / "main.yml")[f"{role}__builtin_keys"])
    assert builtin == _template_keys(role) | COMPONENTS[role][1] | {"config"}
    preflight = _yaml(ROLES / role / "tasks" / "preflight.yml")
    check = preflight[0]["vars"]
    assert check["tickle_service_builtin_keys"] == f"{{{{ {role}__builtin_keys }}}}"
    assert check["tickle_service_extra_config"] == f"{{{{ {role}_extra_config }}}}"


def test_ns_role_enforces_the_api_s_ranges_of_the_central_settings() -> None:
    from tickle.messages import SettingsUpdate

    ranges = _yaml(ROLES / "tickle_notification_server" / "vars" / "main.yml")[
        "tickle_notification_server__settings_ranges"
    ]
    properties = SettingsUpdate.model_json_schema()["properties"]
    assert set(ranges) == set(properties)
    for name, prop in properties.items():
        number = next(p for p in prop.get("anyOf", [prop]) if p.get("type") != "null")
        if number.get("type") == "boolean":  # true or false: 1 or 0 to the role's range check
            assert (ranges[name]["min"], ranges[name]["max"]) == (0, 1), name
            continue
        assert (ranges[name]["min"], ranges[name]["max"]) == (
            number["minimum"],
            number["maximum"],
        ), name


def _port_ranges(role: str) -> dict[str, tuple[int, int]]:
    preflight = _yaml(ROLES / role / "tasks" / "preflight.yml")
    return {r["name"]: (r["min"], r["max"]) for r in preflight[0]["vars"]["tickle_service_ranges"]}


@pytest.mark.parametrize("role", sorted(COMPONENTS))
def test_every_port_is_checked_against_its_range(role: str) -> None:
    ports = [name for name in _defaults(role) if name.endswith("_port")]
    ranges = _port_ranges(role)
    assert ports, role
    assert set(ports) <= set(ranges), f"{role}: ports without a range check"
    assert all(ranges[p][1] == 65535 and ranges[p][0] in (0, 1) for p in ports)


def test_firewall_ports_follow_the_component_roles() -> None:
    defaults = _defaults("tickle_firewall")
    assert "tickle_task_server_tickle_port" in defaults["tickle_firewall_task_server_tickle_port"]
    assert "tickle_client_task_agent_tickle_port" in defaults["tickle_firewall_agent_tickle_port"]
    assert "tickle_task_server_api_port" in defaults["tickle_firewall_api_ports"]
    assert "tickle_notification_server_api_port" in defaults["tickle_firewall_api_ports"]


def test_agent_urls_follow_each_task_server_s_own_port_and_address() -> None:
    urls = _defaults("tickle_client_task_agent")["tickle_client_task_agent_task_server_urls"]
    for name in ("api_url", "api_port", "advertise_host", "tls"):
        assert f"h.tickle_task_server_{name}" in urls, name
