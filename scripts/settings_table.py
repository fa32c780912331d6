"""Renders every component's settings (name, env variable, default, description) as Markdown.

`python scripts/settings_table.py --write` updates README.md between the settings-table markers;
a test checks that the README is current. scripts/architecture.py reuses `components()` and `rows()`
for the settings tables of docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from tickle.config import shown_default

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def components() -> list[tuple[str, type[BaseSettings]]]:
    from tickle.agent.settings import AgentSettings
    from tickle.ns.settings import NsSettings
    from tickle.taskserver.settings import TaskServerSettings

    return [
        ("Notification Server — `tickle ns`", NsSettings),
        ("Task Server — `tickle task-server`", TaskServerSettings),
        ("Client Task Agent — `tickle agent`", AgentSettings),
    ]


def render() -> str:
    parts = []
    for title, cls in components():
        parts += [
            f"**{title}**",
            "",
            "| setting | flag | environment | default | meaning |",
            "|---|---|---|---|---|",
        ]
        for row in rows(cls):
            parts.append(
                f"| `{row.name}` | `{row.flag}` | `{row.env}` | {row.default} | {row.meaning} |"
            )
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


class Row(NamedTuple):
    """One setting as the tables show it (Markdown cells: `|` escaped)."""

    name: str
    flag: str
    env: str
    default: str
    meaning: str


def rows(cls: type[BaseSettings]) -> list[Row]:
    """The settings of `cls` in declaration order."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    return [
        Row(
            name,
            "--" + name.replace("_", "-"),
            f"{prefix}{name.upper()}",
            _shown_default(field).replace("|", "\\|"),
            (field.description or "").replace("|", "\\|"),
        )
        for name, field in cls.model_fields.items()
    ]


def _shown_default(field: FieldInfo) -> str:
    """The default as a reader should see it (the same on every machine), as Python writes it."""
    shown = shown_default(field)
    if shown in ("(required)", "(host name)", "(unset)"):
        return shown
    value = field.get_default(call_default_factory=True)
    return f"`{shown}`" if isinstance(value, str | Path) else f"`{value!r}`"


def current_readme_table() -> str:
    text = README.read_text()
    return text[text.index(START) + len(START) : text.index(END)].strip("\n") + "\n"


def main() -> int:
    table = render()
    if "--write" in sys.argv:
        text = README.read_text()
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        README.write_text(f"{head}{START}\n{table}{END}{tail}")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
