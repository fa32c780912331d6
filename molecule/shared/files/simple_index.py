"""Lays out a directory of wheels as a PEP 503 "simple" package index, served as static files.

    python3 simple_index.py WHEELS_DIR INDEX_DIR

INDEX_DIR/simple/index.html lists the projects; INDEX_DIR/simple/<project>/index.html links each
of its wheels (INDEX_DIR/files/...) with its sha256, which pip checks. Used by the scenarios'
site-services host, so fleet hosts can install with tickle_install_from=index.
"""

from __future__ import annotations

import hashlib
import html
import re
import shutil
import sys
from pathlib import Path


def normalize(name: str) -> str:
    """PEP 503 project name normalization."""
    return re.sub(r"[-_.]+", "-", name).lower()


def build(wheels: Path, index: Path) -> dict[str, list[str]]:
    files = index / "files"
    simple = index / "simple"
    for d in (files, simple):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    projects: dict[str, list[str]] = {}
    for wheel in sorted(wheels.rglob("*.whl")):
        shutil.copy2(wheel, files / wheel.name)
        projects.setdefault(normalize(wheel.name.split("-")[0]), []).append(wheel.name)
    for project, names in projects.items():
        links = []
        for name in names:
            digest = hashlib.sha256((files / name).read_bytes()).hexdigest()
            href = f"../../files/{html.escape(name)}#sha256={digest}"
            links.append(f'<a href="{href}">{html.escape(name)}</a><br>')
        (simple / project).mkdir()
        (simple / project / "index.html").write_text(_page(project, links))
    root = [f'<a href="{p}/">{p}</a><br>' for p in sorted(projects)]
    (simple / "index.html").write_text(_page("simple index", root))
    return projects


def _page(title: str, links: list[str]) -> str:
    body = "\n".join(links)
    head = f"<head><title>{html.escape(title)}</title></head>"
    return f"<!DOCTYPE html>\n<html>{head}<body>\n{body}\n</body></html>\n"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: simple_index.py WHEELS_DIR INDEX_DIR")
    found = build(Path(sys.argv[1]), Path(sys.argv[2]))
    if "tickle" not in found:
        sys.exit(f"no tickle wheel under {sys.argv[1]}")
    print(f"{len(found)} projects, {sum(map(len, found.values()))} wheels")
