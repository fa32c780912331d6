"""Task containment: every process a step starts is found and killed with it, whatever it does.

A step's tree is opened before the step starts and killed when it ends — at its timeout, when
the agent stops, and when its main process exits leaving others running (those are killed: an
execution ends with its main process). Two paths, chosen once when `tickle agent` starts:

- cgroup (`cgroup.py`): under systemd with a delegated cgroup, one cgroup per step;
- subreaper (`subreaper.py`): anywhere else, the agent becomes the subreaper of its tasks and
  follows their processes by ancestry.
"""

from __future__ import annotations

import logging
from typing import Protocol

from tickle.agent.cgroup import Cgroups, delegated_cgroup
from tickle.agent.subreaper import Subreaper

log = logging.getLogger(__name__)


class TaskTree(Protocol):
    """The processes of one step."""

    def command(self, argv: list[str]) -> list[str]:
        """The command that starts `argv` inside the tree."""
        ...

    def started(self, pid: int) -> None:
        """The step's main process is `pid`."""
        ...

    async def kill(self, grace_s: float) -> int:
        """SIGTERM every process, SIGKILL after `grace_s`; how many besides the main process."""
        ...

    def release(self) -> None:
        """The step is over (its processes are gone)."""
        ...


class Containment(Protocol):
    """How this agent contains its steps' process trees."""

    @property
    def kind(self) -> str:
        """ "cgroup" or "subreaper"."""
        ...

    def open(self, label: str, marker: str | None = None) -> TaskTree:
        """A tree for one step; `marker` is a "NAME=value" of its environment."""
        ...

    async def close(self, grace_s: float) -> None:
        """The agent stops: kill whatever is left."""
        ...


def detect() -> Containment:
    """The containment of this agent process: its delegated cgroup, else it becomes a subreaper.

    Called once by `tickle agent` before anything runs (it may move this process to a cgroup).
    """
    base, why = delegated_cgroup()
    if base is not None:
        try:
            cgroups = Cgroups.enter(base)
        except OSError as exc:
            why = f"cannot use {base}: {exc}"
        else:
            log.info("tasks contained: a cgroup per step below %s", base)
            return cgroups
    try:
        subreaper = Subreaper.install()
    except OSError as exc:
        log.warning("tasks contained only by their process group: %s (no cgroup: %s)", exc, why)
        return Subreaper()
    log.info("tasks contained: the agent is their subreaper (no cgroup: %s)", why)
    return subreaper
