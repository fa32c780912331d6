"""Writes the generated sections of docs/ARCHITECTURE.md from the code.

- `modules`: every module of `src/tickle/` with the first sentence of its docstring, the tickle
  modules it imports (read from its syntax tree; `lazy:` ones inside a function) and the
  third-party packages it imports, grouped as the import-linter contracts in pyproject.toml group
  them (shared modules, the three components, what sits above them);
- `ns-routes`, `ts-routes`: the routes of the notification server and of the task server, from
  their apps' OpenAPI documents (tag, credentials, query parameters with their values and
  defaults, request and answer bodies);
- `bodies`: every JSON body of those documents, field by field (type, range, default);
- `settings`: every setting of each component with its default and its range (the rows of
  scripts/settings_table.py, which writes README's table).

`python scripts/architecture.py --write` rewrites the sections between their
`<!-- generated:NAME:start -->` and `<!-- generated:NAME:end -->` markers (`make docs`);
tests/test_docs.py fails when a section differs from what this renders.
"""

from __future__ import annotations

import ast
import functools
import json
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
SRC = ROOT / "src"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
if str(SCRIPTS) not in sys.path:  # settings_table is a sibling script, not a package
    sys.path.insert(0, str(SCRIPTS))

import settings_table  # noqa: E402

# the generated sections, in the order the document has them
SECTIONS = ("modules", "ns-routes", "ts-routes", "bodies", "settings")


def start_marker(name: str) -> str:
    return f"<!-- generated:{name}:start -->"


def end_marker(name: str) -> str:
    return f"<!-- generated:{name}:end -->"


def render() -> dict[str, str]:
    """Every generated section by name, as the code gives it now."""
    ns, ts = ns_openapi(), ts_openapi()
    sections = {
        "modules": render_modules(),
        "ns-routes": render_routes(ns),
        "ts-routes": render_routes(ts),
        "bodies": render_bodies([ns, ts]),
        "settings": render_settings(),
    }
    return {name: sections[name] for name in SECTIONS}


def current() -> dict[str, str]:
    """The generated sections as docs/ARCHITECTURE.md has them (those whose markers it has)."""
    text = ARCHITECTURE.read_text()
    found = {}
    for name in SECTIONS:
        start, end = start_marker(name), end_marker(name)
        if start in text and end in text:
            found[name] = text[text.index(start) + len(start) : text.index(end)].strip("\n") + "\n"
    return found


def write(sections: dict[str, str]) -> None:
    text = ARCHITECTURE.read_text()
    for name, body in sections.items():
        head, rest = text.split(start_marker(name), 1)
        _, tail = rest.split(end_marker(name), 1)
        text = f"{head}{start_marker(name)}\n{body}{end_marker(name)}{tail}"
    ARCHITECTURE.write_text(text)


def main() -> int:
    sections = render()
    if "--write" in sys.argv:
        write(sections)
    else:
        for name, body in sections.items():
            print(f"{start_marker(name)}\n{body}{end_marker(name)}\n")
    return 0


# --- modules and their imports ---------------------------------------------------------------


@dataclass
class Module:
    name: str  # dotted, as shown: without the leading "tickle." (the package itself: "tickle")
    purpose: str
    imports: set[str] = field(default_factory=set)  # tickle modules, at module level
    lazy: set[str] = field(default_factory=set)  # tickle modules imported inside a function
    external: set[str] = field(default_factory=set)  # third-party top-level packages


def modules() -> dict[str, Module]:
    """Every module under src/tickle, by its full dotted name."""
    files = {_dotted(path): path for path in sorted((SRC / "tickle").rglob("*.py"))}
    found = {}
    for dotted, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        module = Module(_short(dotted), _purpose(ast.get_docstring(tree) or ""))
        for node, in_function in _imports(tree):
            for target in _targets(node, dotted, path.name == "__init__.py", set(files)):
                if not _is_tickle(target):
                    if target not in sys.stdlib_module_names:
                        module.external.add(target)
                elif target != dotted:
                    (module.lazy if in_function else module.imports).add(_short(target))
        module.lazy -= module.imports
        found[dotted] = module
    return found


def render_modules() -> str:
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    components = next(c["modules"] for c in contracts["contracts"] if c["type"] == "independence")
    shared = next(
        c["source_modules"]
        for c in contracts["contracts"]
        if c["type"] == "forbidden" and set(components) <= set(c["forbidden_modules"])
    )
    groups: dict[str, list[Module]] = {"shared": []}
    groups.update({c.removeprefix("tickle."): [] for c in components})
    groups["above"] = []
    for module in modules().values():
        top = module.name.split(".")[0]
        if module.name == "tickle" or f"tickle.{top}" in shared:
            groups["shared"].append(module)
        elif top in groups:
            groups[top].append(module)
        else:
            groups["above"].append(module)
    titles = {
        "shared": "Shared modules (import no component)",
        "ns": "`ns/`: the notification server and its tickle server",
        "taskserver": "`taskserver/`: the task server",
        "agent": "`agent/`: the client task agent",
        "above": "Above the components (may import them; nothing imports these)",
    }
    parts = []
    for key, members in groups.items():
        parts += [
            f"**{titles.get(key, key)}**",
            "",
            "| module | what it holds | imports from tickle | third-party |",
            "|---|---|---|---|",
        ]
        for m in members:
            imports = ", ".join(f"`{i}`" for i in sorted(m.imports))
            if m.lazy:
                imports += ("; " if imports else "") + "lazy: "
                imports += ", ".join(f"`{i}`" for i in sorted(m.lazy))
            external = ", ".join(f"`{e}`" for e in sorted(m.external))
            parts.append(
                f"| `{m.name}` | {_cell(m.purpose)} | {imports or '—'} | {external or '—'} |"
            )
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def _dotted(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _short(dotted: str) -> str:
    return dotted.removeprefix("tickle.")


def _is_tickle(dotted: str) -> bool:
    return dotted == "tickle" or dotted.startswith("tickle.")


def _purpose(docstring: str) -> str:
    """The docstring's first sentence (of its first paragraph)."""
    paragraph = " ".join(docstring.split("\n\n")[0].split())
    end = paragraph.find(". ")
    return paragraph if end < 0 else paragraph[: end + 1]


def _imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement, and whether it sits inside a function."""

    def walk(
        node: ast.AST, in_function: bool
    ) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, in_function
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            yield from walk(child, inner)

    return walk(tree, False)


def _targets(
    node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, known: set[str]
) -> set[str]:
    """The modules an import statement loads: tickle ones in full, others by top-level name."""
    if isinstance(node, ast.Import):
        return {_resolve(alias.name, known) for alias in node.names}
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
    if not _is_tickle(base):
        return {_resolve(base, known)}
    # `from tickle.ns import routes` loads tickle.ns.routes; `from tickle.ns.stores import Stores`
    # loads tickle.ns.stores
    return {_resolve(f"{base}.{alias.name}", known) for alias in node.names}


def _resolve(dotted: str, known: set[str]) -> str:
    """The longest known tickle module that `dotted` names; another package's top-level name."""
    if not _is_tickle(dotted):
        return dotted.split(".")[0]
    while dotted not in known:
        dotted = dotted.rsplit(".", 1)[0]
    return dotted


# --- routes from the OpenAPI documents -------------------------------------------------------


def ns_openapi() -> dict[str, Any]:
    """The notification server's OpenAPI document, from its app built over an empty database."""
    from tickle.metrics import ComponentMetrics
    from tickle.ns.api import create_app
    from tickle.ns.settings import NsSettings
    from tickle.ns.stores import Stores
    from tickle.ns.tickle_server import TickleServer

    with tempfile.TemporaryDirectory() as state_dir:
        settings = NsSettings(
            state_dir=Path(state_dir), admin_token="x" * 16, enrollment_secret="x" * 16
        )
        stores = Stores.open("sqlite://")
        try:
            metrics = ComponentMetrics("ns")
            app = create_app(settings, stores, TickleServer(settings, stores, metrics), metrics)
            return app.openapi()
        finally:
            stores.close()


def ts_openapi() -> dict[str, Any]:
    """The task server's OpenAPI document, from its app over a throwaway state directory."""
    from tickle.taskserver.service import TaskServer
    from tickle.taskserver.settings import TaskServerSettings

    with tempfile.TemporaryDirectory() as state_dir:
        server = TaskServer(
            TaskServerSettings(
                state_dir=Path(state_dir),
                enrollment_secret="x" * 16,
                agent_enrollment_secret="y" * 16,
            )
        )
        try:
            return server.api_app().openapi()
        finally:
            server.store.close()
            server.outbox.close()


def render_routes(doc: dict[str, Any]) -> str:
    schemes = doc.get("components", {}).get("securitySchemes", {})
    lines = [
        "| route | tag | credentials | query | body | answer | what |",
        "|---|---|---|---|---|---|---|",
    ]
    notes: dict[tuple[str, str], list[str]] = {}  # (parameter, description) -> its routes
    for path, item in doc["paths"].items():
        for method, op in item.items():
            route = f"`{method.upper()} {path}`"
            query = []
            for param in op.get("parameters", []):
                if param["in"] != "query":
                    continue
                schema = param["schema"]
                default = f", default `{schema['default']}`" if "default" in schema else ""
                query.append(f"`{param['name']}`: {shape(schema, doc)}{default}")
                if param.get("description"):
                    notes.setdefault((param["name"], param["description"]), []).append(route)
            what = op.get("summary", "")
            if op.get("description"):
                what += ". " + op["description"].split("\f")[0]
            lines.append(
                f"| {route} | {', '.join(op.get('tags', [])) or '—'} | {_credentials(op, doc)} "
                f"| {'; '.join(query) or '—'} | {_body(op, doc)} | {_answer(op, doc)} "
                f"| {_cell(what)} |"
            )
    credentials = [
        f"- `{name}`: bearer token (`Authorization: Bearer <token>`) — {s.get('description', '')}"
        for name, s in schemes.items()
    ]
    parts = ["\n".join(lines), ""]
    if notes:
        parts += ["Query parameters:", ""]
        parts += [f"- `{n}` of {', '.join(routes)}: {d}" for (n, d), routes in notes.items()]
        parts.append("")
    if credentials:
        parts += ["Credentials:", "", *credentials, ""]
    return "\n".join(parts).rstrip() + "\n"


def _credentials(op: dict[str, Any], doc: dict[str, Any]) -> str:
    if op.get("security"):
        return ", ".join(f"`{name}`" for req in op["security"] for name in req)
    schema = _request_schema(op, doc)
    if schema is not None and "enrollment_secret" in schema.get("properties", {}):
        return "enrollment secret (in the body)"
    return "none"


def _request_schema(op: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any] | None:
    content = op.get("requestBody", {}).get("content", {}).get("application/json")
    if content is None:
        return None
    return _deref(content["schema"], doc)


def _body(op: dict[str, Any], doc: dict[str, Any]) -> str:
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" not in content:
        return "—"
    return shape(content["application/json"]["schema"], doc)


def _answer(op: dict[str, Any], doc: dict[str, Any]) -> str:
    status, response = next((s, r) for s, r in op["responses"].items() if s.startswith("2"))
    prefix = "" if status == "200" else f"{status} "
    content = response.get("content", {})
    if "application/json" in content:
        return prefix + shape(content["application/json"]["schema"], doc)
    return prefix + (", ".join(f"`{kind}`" for kind in content) or "(empty)")


# --- bodies ----------------------------------------------------------------------------------


def render_bodies(docs: list[dict[str, Any]]) -> str:
    schemas: dict[str, dict[str, Any]] = {}
    owner: dict[str, dict[str, Any]] = {}
    for doc in docs:
        for name, schema in doc.get("components", {}).get("schemas", {}).items():
            if name in schemas and schemas[name] != schema:
                raise ValueError(f"the two APIs define {name} differently")
            schemas[name], owner[name] = schema, doc
    lines = ["| body | field | type | default |", "|---|---|---|---|"]
    for name in sorted(schemas):
        schema, doc = schemas[name], owner[name]
        required = set(schema.get("required", []))
        first = f"`{name}`"
        for field_name, prop in schema.get("properties", {}).items():
            if field_name in required:
                default = "required"
            elif "default" in prop:
                default = _value(prop["default"])
            else:
                default = "optional"
            lines.append(f"| {first} | `{field_name}` | {shape(prop, doc)} | {default} |")
            first = ""
    name_schema = _name_schema()
    legend = (
        f"A `name` is {name_schema['minLength']}..{name_schema['maxLength']} characters matching "
        f"`{name_schema['pattern']}` (`messages.Name`)."
    )
    legend += (
        " `required`: the field must be there; `optional`: it may be left out (null, or empty for"
        " a list); a value: the default when left out. A field a body does not define is an"
        " error (a request with one gets a 422; the models on both sides are strict)."
    )
    return "\n".join(lines) + "\n\n" + legend + "\n"


def _value(value: Any) -> str:
    return f"`{json.dumps(value)}`"


# --- settings --------------------------------------------------------------------------------


def render_settings() -> str:
    parts = []
    for title, cls in settings_table.components():
        props = cls.model_json_schema()["properties"]
        parts += [
            f"**{title}**",
            "",
            "| setting | environment | default | values | meaning |",
            "|---|---|---|---|---|",
        ]
        for row in settings_table.rows(cls):
            values = shape(props[row.name], {})
            parts.append(
                f"| `{row.name}` | `{row.env}` | {row.default} | {values} | {row.meaning} |"
            )
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


# --- JSON schema → a short Markdown type -----------------------------------------------------


def shape(schema: dict[str, Any], doc: dict[str, Any]) -> str:
    """A JSON schema as a short type with its range, for a Markdown table cell."""
    if "$ref" in schema:
        return f"`{schema['$ref'].rsplit('/', 1)[-1]}`"
    if "anyOf" in schema:
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        text = " or ".join(shape(s, doc) for s in options)
        return text + (" or null" if len(options) < len(schema["anyOf"]) else "")
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    kind = schema.get("type")
    if kind == "array":
        items = shape(schema.get("items", {}), doc)
        count = _range(schema.get("minItems"), schema.get("maxItems"), "items")
        return f"list[{items}]" + (f" ({count})" if count else "")
    if kind == "object":
        extra = schema.get("additionalProperties")
        return f"dict[string, {shape(extra, doc)}]" if isinstance(extra, dict) else "object"
    if kind == "string":
        if _is_name(schema):
            return "name"
        text = {"path": "path", "file-path": "path of a file"}.get(schema.get("format", ""), kind)
        size = _range(schema.get("minLength"), schema.get("maxLength"), "chars")
        if size:
            text += f" ({size})"
        if "pattern" in schema:
            text += f" matching `{schema['pattern']}`"
        return text
    if kind in ("integer", "number"):
        bounds = _bounds(schema)
        return kind + (f" {bounds}" if bounds else "")
    if kind is None:
        return "any"
    return str(kind)


def _range(low: int | None, high: int | None, unit: str) -> str:
    if low is not None and high is not None:
        return f"{low}..{high} {unit}"
    if low is not None:
        return f"≥ {low} {unit}" if low else ""
    if high is not None:
        return f"≤ {high} {unit}"
    return ""


def _bounds(schema: dict[str, Any]) -> str:
    low, high = _number(schema.get("minimum")), _number(schema.get("maximum"))
    if (low, high) == (-(2**31), 2**31 - 1):
        return "(32-bit)"
    if high == 2**31 - 1:  # the database's INTEGER column
        return f"≥ {low} (32-bit)"
    if low is not None and high is not None:
        return f"{low}..{high}"
    parts = []
    if "exclusiveMinimum" in schema:
        parts.append(f"> {_number(schema['exclusiveMinimum'])}")
    elif low is not None:
        parts.append(f"≥ {low}")
    if "exclusiveMaximum" in schema:
        parts.append(f"< {_number(schema['exclusiveMaximum'])}")
    elif high is not None:
        parts.append(f"≤ {high}")
    return ", ".join(parts)


def _number(value: float | None) -> float | None:
    """A bound as written in the code (OpenAPI turns `le=65535` into 65535.0)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@functools.cache
def _name_schema() -> dict[str, Any]:
    from pydantic import TypeAdapter

    from tickle.messages import Name

    schema: dict[str, Any] = TypeAdapter(Name).json_schema()
    return schema


def _is_name(schema: dict[str, Any]) -> bool:
    name = _name_schema()
    return all(schema.get(k) == name[k] for k in ("pattern", "minLength", "maxLength"))


def _deref(schema: dict[str, Any], doc: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        target: Any = doc
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        schema = target
    return schema


def _cell(text: str) -> str:
    """Text for one Markdown table cell: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


if __name__ == "__main__":
    sys.exit(main())
