"""Renders every component's settings (name, env variable, default, description) as Markdown.

`python scripts/settings_table.py --write` updates README.md between the settings-table markers;
a test checks that the README is current.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pydantic_settings import BaseSettings

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
        prefix = str(cls.model_config.get("env_prefix", ""))
        parts += [f"**{title}**", "", "| setting | environment | default | meaning |", "|---|---|---|---|"]
        for name, field in cls.model_fields.items():
            default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
            default = default.replace("|", "\\|")
            desc = (field.description or "").replace("|", "\\|")
            parts.append(f"| `{name}` | `{prefix}{name.upper()}` | `{default}` | {desc} |")
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


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
