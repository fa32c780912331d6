"""The docs say what the code does: the README's settings table and the generated sections of
docs/ARCHITECTURE.md match the code, and the docs point only at files that exist."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def architecture() -> ModuleType:
    return _script("architecture")


def test_readme_settings_table_matches_the_settings_classes() -> None:
    module = _script("settings_table")
    assert module.current_readme_table() == module.render(), "run `make docs` to update README.md"


def test_readme_starts_with_the_two_commands() -> None:
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:30])
    assert "make demo" in head
    assert "make test" in head


def test_architecture_generated_sections_match_the_code(architecture: ModuleType) -> None:
    # modules and imports, both route tables, the bodies, the settings
    rendered = architecture.render()
    in_doc = architecture.current()
    assert set(in_doc) == set(rendered), "a generated:NAME:start/end marker pair is missing"
    stale = [name for name in rendered if in_doc[name] != rendered[name]]
    assert stale == [], f"run `make docs`: {stale} in docs/ARCHITECTURE.md differ from the code"


def test_architecture_lists_every_route_and_setting(architecture: ModuleType) -> None:
    sections = architecture.current()
    for section, doc in (("ns-routes", architecture.ns_openapi()),
                         ("ts-routes", architecture.ts_openapi())):  # fmt: skip
        for path, item in doc["paths"].items():
            for method in item:
                assert f"`{method.upper()} {path}`" in sections[section]
    for _, cls in _script("settings_table").components():
        prefix = cls.model_config["env_prefix"]
        for name in cls.model_fields:
            assert f"`{prefix}{name.upper()}`" in sections["settings"]


def test_architecture_import_edges_are_the_graph_import_linter_checks(
    architecture: ModuleType,
) -> None:
    graph = grimp.build_graph("tickle", include_external_packages=True)
    for dotted, module in architecture.modules().items():
        if dotted not in graph.modules:  # Alembic revision files are not importable names
            assert ".migrations.versions." in dotted
            continue
        imported = graph.find_modules_directly_imported_by(dotted)
        ours = {m for m in imported if m.split(".")[0] == "tickle"}
        internal = {m.removeprefix("tickle.") for m in ours}
        external = imported - ours - set(sys.stdlib_module_names)
        assert module.imports | module.lazy == internal, dotted
        assert module.external == external, dotted


def test_the_docs_point_only_at_files_in_the_repository() -> None:
    for doc in (ROOT / "README.md", ARCHITECTURE):
        text = doc.read_text()
        links = re.findall(r"\]\(([^)#\s]+)[^)]*\)", text)
        named = re.findall(r"`([\w./-]+\.md)`", text)
        for target in [t for t in links if "://" not in t] + named:
            found = [p.resolve() for p in (doc.parent / target, ROOT / target) if p.exists()]
            assert any(p.is_relative_to(ROOT) for p in found), f"{doc.name} names {target}"
