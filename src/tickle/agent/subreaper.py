"""The subreaper path of task containment: the agent process adopts every orphan of its tasks.

`tickle agent` makes itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so a process whose
parent dies is reparented to the agent instead of to init, however it got there (double fork,
new session): every process a task ever started stays below the agent. Whose it is:

- below a step's main process: that step's (ancestry);
- an orphan the agent adopted: the step it was seen under before (the agent looks at its steps'
  trees every second while they run), the step whose session or process group it is in, or the
  step whose `TICKLE_EXECUTION_ID` its environment holds;
- an orphan none of that tells apart (a new session and an emptied environment, orphaned before
  it was ever seen) could be any running step's: it is killed when the last of the steps that
  were running when it appeared ends — never before, so a step never kills another's process.

The agent reaps the orphans it adopted and never waits for a pid it did not adopt (asyncio waits
for the main processes). A process that is not a subreaper (`Subreaper()`: tests that run the
executor in-process, embedding) contains less: orphans go to init as before, and a step's tree is
what is still below its main process, and its process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal

from tickle.agent import processes
from tickle.agent.processes import Key, Proc

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
# how often the agent learns whose each process is while steps run
TRACK_EVERY_S = 1.0

# whose a process is: a step's tree, or None (a stray: one of the running steps', which is unknown)
Owners = dict[int, "SubreaperTree | None"]


def become_subreaper() -> None:
    """Make this process the child subreaper of everything it starts (Linux ≥ 3.4)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")


class Subreaper:
    """Contains task trees by ancestry, with this process as their subreaper."""

    kind = "subreaper"

    def __init__(self, adopts: bool = False) -> None:
        # True: this process is a subreaper, and starts children only through the executor
        self.adopts = adopts
        self._me = os.getpid()
        self._my_session = os.getsid(0)
        self._trees: set[SubreaperTree] = set()
        # each stray with the steps that were running when it was first seen
        self._strays: dict[Key, frozenset[SubreaperTree]] = {}
        self._tracker: asyncio.Task[None] | None = None

    @classmethod
    def install(cls) -> Subreaper:
        """Make this process the subreaper of its tasks' orphans, and contain them by that."""
        become_subreaper()
        return cls(adopts=True)

    def open(self, label: str, marker: str | None = None) -> SubreaperTree:
        """A tree for one step; `marker` is the "NAME=value" its environment carries (`label`
        names a cgroup in the cgroup path; processes here are told apart otherwise)."""
        tree = SubreaperTree(self, marker)
        self._trees.add(tree)
        if self.adopts and self._tracker is None:
            self._tracker = asyncio.create_task(self._track())
        return tree

    async def close(self, grace_s: float) -> None:
        """The agent stops: kill whatever is still below it (each step killed its own before)."""
        if self._tracker is not None:
            self._tracker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tracker
        if self.adopts:
            left = await processes.terminate(self._all_adopted, grace_s)
            if left:
                log.warning("killed %d task processes still running at the agent's stop", len(left))

    def members(self, tree: SubreaperTree) -> list[Proc]:
        """The live processes of `tree`, with the strays nobody but it could still own."""
        owners, below = self._look()
        others = self._trees - {tree}
        return [
            p for pid, p in below.items()
            if p.alive and pid in owners
            and (owners[pid] is tree
                 or (owners[pid] is None and not self._strays.get(p.key, others) & others))
        ]  # fmt: skip

    def release(self, tree: SubreaperTree) -> None:
        self._trees.discard(tree)

    # --- internals -----------------------------------------------------------------------------

    def _look(self) -> tuple[Owners, dict[int, Proc]]:
        """What is below now, whose each process is, and reap the adopted zombies among them."""
        below = self._below()
        self._reap(below)
        return self._attribute(below), below

    def _below(self) -> dict[int, Proc]:
        if self.adopts:
            # no child at all: nothing of any task is left (the common case, and cheap)
            return processes.subtree(self._me) if _has_children() else {}
        below: dict[int, Proc] = {}
        for tree in self._trees:
            if (main := tree.main_proc()) is not None:
                below[main.pid] = main
                below.update(processes.subtree(main.pid))
        return below

    def _attribute(self, below: dict[int, Proc]) -> Owners:
        """Whose each task process below is; learn it for later (the tree's `known`)."""
        mains = {t.main: t for t in self._trees if t.main is not None}
        children: dict[int, list[Proc]] = {}
        for p in below.values():
            children.setdefault(p.ppid, []).append(p)
        owners: Owners = {}
        # (process, owner, whether ancestry decided it: below a live main process, it is certain)
        todo: list[tuple[Proc, SubreaperTree | None, bool]] = []
        for p in below.values():
            if p.key in mains:
                todo.append((p, mains[p.key], True))
            elif p.ppid not in below and p.sid != self._my_session:
                todo.append((p, self._claim(p), False))  # an orphan the agent adopted
        running = frozenset(self._trees)
        while todo:
            p, owner, certain = todo.pop()
            owners[p.pid] = owner
            if owner is None:
                self._strays.setdefault(p.key, running)
            else:
                owner.known.add(p.key)
            for child in children.get(p.pid, []):
                if child.pid not in owners and child.key not in mains:
                    claimed = owner if certain else self._claim(child) or owner
                    todo.append((child, claimed, certain))
        return owners

    def _claim(self, p: Proc) -> SubreaperTree | None:
        """The running step a process shows it belongs to, if any."""
        for tree in self._trees:
            if p.key in tree.known or tree.pid in (p.sid, p.pgid):
                return tree
        for tree in self._trees:
            if tree.marker is not None and processes.environ_has(p.pid, tree.marker):
                return tree
        return None

    def _reap(self, below: dict[int, Proc]) -> None:
        """Wait for the zombies this process adopted (never for a pid asyncio waits for)."""
        if not self.adopts:
            return
        mains = {t.main for t in self._trees}
        # a step being started has a main process asyncio will wait for, whose pid it has not
        # handed over yet: leave every session leader alone meanwhile
        spawning = any(t.pid is None for t in self._trees)
        for p in below.values():
            if p.ppid != self._me or p.alive or p.key in mains or p.sid == self._my_session:
                continue
            if not (spawning and p.sid == p.pid):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(p.pid, os.WNOHANG)

    def _all_adopted(self) -> list[Proc]:
        owners, below = self._look()
        return [p for pid, p in below.items() if p.alive and pid in owners]

    async def _track(self) -> None:
        """While steps run: learn whose each process is, reap, forget what is gone."""
        try:
            while self._trees:
                await asyncio.sleep(TRACK_EVERY_S)
                _, below = self._look()
                live = {p.key for p in below.values()}
                self._strays = {k: v for k, v in self._strays.items() if k in live}
                for tree in self._trees:
                    tree.known &= live
        finally:
            self._tracker = None


class SubreaperTree:
    """The processes of one step, found by ancestry and by what the agent learnt about them."""

    def __init__(self, owner: Subreaper, marker: str | None) -> None:
        self.owner = owner
        self.marker = marker.encode() if marker is not None else None
        self.pid: int | None = None  # the main process, leader of the step's session and group
        self.main: Key | None = None
        self.known: set[Key] = set()

    def command(self, argv: list[str]) -> list[str]:
        return argv

    def started(self, pid: int) -> None:
        self.pid = pid
        main = processes.stat(pid)
        self.main = main.key if main is not None else None

    def main_proc(self) -> Proc | None:
        p = processes.stat(self.pid) if self.pid is not None else None
        return p if p is not None and p.key == self.main else None

    async def kill(self, grace_s: float) -> int:
        """Kill every process of the step, its main process too; how many others there were."""
        killed = await processes.terminate(lambda: self.owner.members(self), grace_s)
        if not self.owner.adopts and self.pid is not None:
            # not a subreaper: orphans went to init; those still in the step's group die with it
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        return len(killed - {self.main})

    def release(self) -> None:
        self.owner.release(self)


def _has_children() -> bool:
    """Whether this process has any child at all (alive or not), without reaping one."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True
