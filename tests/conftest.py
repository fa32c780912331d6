"""Suite-wide hooks: how `pytest -n N --dist loadgroup` (pytest-xdist) shares the tests out.

A test module whose own fixtures live for the module (a fleet of processes, a browser) runs on one
worker as a group, so that fixture starts once, as it does without xdist; every other test goes to
whichever worker is free. Each worker takes its own loopback range (`tests.integration.conftest`'s
NET_BASE), so fleets of two workers never share an address.
"""

from __future__ import annotations

from typing import Any

import pytest

SHARED_SCOPES = {"module", "class", "package"}


def pytest_itemcollected(item: pytest.Item) -> None:
    """Group a test using a module-scoped fixture of the suite by its module (during collection:
    before xdist's own collection hook reads the groups into the test ids)."""
    info: Any = getattr(item, "_fixtureinfo", None)
    if info is None:
        return
    shared = any(
        d.scope in SHARED_SCOPES and d.func.__module__.startswith("tests.")
        for defs in info.name2fixturedefs.values()
        for d in defs
    )
    if shared:
        item.add_marker(pytest.mark.xdist_group(item.module.__name__))  # type: ignore[attr-defined]
