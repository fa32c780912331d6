"""The work cache: the NS's unfinished work for this task server's agents, and its status events.

A work pull from the NS reconciles the cache with the NS's list. What happens to cached work is
reported to the NS as status events, each committed to the outbox before it counts: the hops the
task server sees (`agent_tickled`, `agent_pulled`: once per execution) and the agents' own events
(`finished` takes the execution out of the agent's pulls).

Group commit: the writes of every request served in one turn of the event loop (pulls, event
posts, tickles sent) are committed together, one transaction per database for all of them, and
each request is answered once its own writes are durable. Given a `localdb.WalSync`, the
transactions commit without a sync and the sync (fsync of both write-ahead logs) runs in a
thread, shared by every turn committed while the previous sync ran: the event loop serves the
next requests meanwhile, where a full-sync commit stopped it for two fsyncs per turn (a third of
the task server's time in issue 10's S5 profile). The in-memory flags change at the commit (a hop's
when it is reported, below), so a request of the next turn sees them; only the answers wait for
the sync (a power cut before it loses writes nobody was told of: the agent posts its events
again, a hop is reported again).

An agent's events that come while a sync runs are held, not committed at once: they could be
answered only after the next sync anyway, which starts when the running one ends, so they are
committed together then, in one transaction per database. Committed turn by turn, a fleet's
events spread over seconds (agents at rest, each opening its connection) made a commit of a few
writes every turn: 5,000 agents, one task server's 1,250 of them, ~2,000 commits for 434 syncs
(issue 10, S8). Until it commits, a held `finished` keeps its execution out of its agent's pulls.
Not held: the events of an agent that is alone, no other agent having posted within
`ALONE_WINDOW_S` and nothing held: they commit at once, so they go to the NS at once, and are
answered after the next sync as they would be held. Held, one agent's `finished` waited for the
sync of its own `started` two milliseconds before (two fsyncs): S1's hop cached_at_ts → recorded
took 1.57-1.70 ms at p50 held, 0.63-0.70 ms committed at once (alternated runs).

A fan-out's pulls first: while tickled agents' pulls are due (`tickling.PullsDue`: first sends
neither pulled nor resent yet), agents' events are held too, `pulls_first_s` at most from the
first one held, then committed together (after the running sync, if any), `COMMIT_MAX_WRITES`
a transaction, a transaction a turn of the event loop (the requests still coming are served
between). A run-now on a task server's 2,500 agents had their pulls, their event posts, the
commits, the forwarding and the NS's recording of them share its core and the machine's; the
agents now get their tasks first and the events go in a few large commits and posts after
(issue 10, S5: 2,525-2,905 pulls a second where the pulls came at 1,899-1,933, the task
server's CPU 404-456 µs an agent, not 496-528; S2, 10,000 agents over 4 task servers: all
recorded in 4.26-4.28 s, not 4.68-5.29, alternated runs). A lost tickle counts only until its
first resend, and an agent alone is never held; nothing is held while the agent API's
connections are crowded (a held post keeps its connection: `release_now`). Most events do not
even come meanwhile: the agent API does not serve the events an agent posts after its pull
while pulls are due (`TaskServer._request_hold`, `serving.RequestHold`). The task server's own
hop reports (below) wait too, `pulls_first_s` at most from the first put off: their commits,
their forwarding and the NS's recording of them came between the pulls (S5: 3,016-3,663 pulls
a second against 2,842-3,180, alternated runs).

The task server's own hop reports (`agent_tickled`, `agent_pulled`) are waited for by nobody: a
pull is answered, and a tickle goes on, before its report commits (its flag is set in memory at
once: whom to tickle, whether a long-poll has news). The report rides the next group
commit (the agent's events, which follow its pull within milliseconds), or commits alone
`HOP_COMMIT_S` later at the latest, and is not synced by itself: a power cut can undo it until the
next synced commit. A crash of the process before it commits loses the hop's time from the
timeline (the flag is lost with it, so a pull after the restart reports it again); the execution
itself is the agent's to report, from its own outbox. What else it can lose is a hop reported
twice (flag lost, event kept: the NS keeps a hop's first time). Committed before each pull's
answer, a fleet's spread-out pulls (agents at rest, each opening its connection) made one commit
per pull, every commit of S8's cold runs held an `agent_pulled` (~1,300 for a task server's 1,250
agents), and the two syncs of a full-sync commit had sat between an agent's tickle and its pull.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from tickle import agentapi
from tickle.localdb import WalSync
from tickle.messages import ExecutionWork, PullVia, StatusEvent, WorkOut
from tickle.metrics import ComponentMetrics
from tickle.outbox import OutboxForwarder, new_event_id
from tickle.taskserver.refusal import Refused
from tickle.taskserver.store import CachedWork, Store
from tickle.tickling import PullsDue

log = logging.getLogger(__name__)

AGENT_EVENT_KINDS = frozenset({"started", "step_finished", "finished"})

Flag = Literal["agent_tickled", "agent_pulled", "done"]
# a status event: an agent's (validated by the route's pydantic model, or by the fast path's
# msgspec Struct of the same fields and limits: tests/shared/test_agentapi.py), or a hop report
# of the task server's own (a Struct: a pydantic model cost ~10 times as much to make and write)
Event = StatusEvent | agentapi.StatusEvent
# how long the task server's own hop reports (`agent_tickled`, `agent_pulled`) may wait to go to
# the NS with the agent's next event (its `started` comes a few ms after its pull): one post and
# one NS transaction for the three, where each went alone (S1: four posts a run, two of them
# hops). Alone past this (an agent that does not pull, or does not start).
HOP_REPORTS_WAIT_S = 0.25
# how long a hop report may wait for a group commit to ride before it commits alone (see the
# module's doc): the agent's events come well within it
HOP_COMMIT_S = 0.05
# an agent whose events come while a sync runs is alone, and its events commit at once, when no
# other agent posted events within this long (see the module's doc): a fleet's agents post many
# a second, one agent's run two events milliseconds apart
ALONE_WINDOW_S = 0.1
# writes (a request's events, a hop report) per transaction: a fan-out's held writes go in
# transactions of at most this many, one per turn of the event loop, the pulls still coming served
# between them. All in one, a task server's 2,500 agents' events and hop reports (10,000 events in
# 6 commits) held its event loop 0.58 s of wall time in all, the pulls due waiting (S2, 10,000
# agents over 4 task servers: all recorded after 7.7 s against 8.4 s, medians of 8 alternated runs)
COMMIT_MAX_WRITES = 256


@dataclass
class _Write:
    """One request's share of a group commit: its events, and the flag they set; `committed`
    tells the request when they are durable (a hop report, waited for by nobody, has none)."""

    events: list[Event]
    flag: Flag
    flagged: list[int]
    committed: asyncio.Future[set[str]] | None = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # a hop report's events, made when it commits (put off while pulls are due, they were made
    # in the fan-out's pulls, two of them an agent): (execution id, computer, at, cached at)
    hops: list[tuple[int, str, float, float]] = field(default_factory=list)
    via: PullVia | None = None

    def made(self) -> list[Event]:
        """Its events, a hop report's made now."""
        if self.hops:
            flag = self.flag
            assert flag != "done", "a hop report is agent_tickled or agent_pulled"
            self.events += [
                agentapi.StatusEvent(
                    event_id=new_event_id(),
                    execution_id=eid,
                    computer=computer,
                    kind=flag,
                    at=at,
                    cached_at=cached_at,
                    via=self.via,
                )
                for eid, computer, at, cached_at in self.hops
            ]
            self.hops = []
        return self.events

    def tell(self, outcome: set[str] | BaseException) -> None:
        """Tell the request waiting for it (if any) that it is durable, or why not."""
        if self.committed is None:
            return
        if isinstance(outcome, BaseException):
            self.committed.set_exception(outcome)
        else:
            self.committed.set_result(outcome)


class WorkCache:
    """Keeps the cache in step with the NS and queues the status events of its executions."""

    def __init__(
        self,
        store: Store,
        forwarder: OutboxForwarder,
        metrics: ComponentMetrics,
        wal_sync: WalSync | None = None,
        pulls_due: PullsDue | None = None,
        pulls_first_s: float = 0.0,
    ) -> None:
        """`wal_sync`: syncs the store's and the outbox's databases (None: each group commit
        syncs as it commits, on the event loop). `pulls_due`: the agent tickler's tickles
        awaiting their pull; while there are, the agents' events are held, `pulls_first_s` at
        most (see the module's doc)."""
        self._store = store
        self._forwarder = forwarder
        self._metrics = metrics
        self._wal_sync = wal_sync
        self._pulls_due = pulls_due if pulls_first_s > 0 else None
        self._pulls_first_s = pulls_first_s
        # whether the agent API's connections are crowded (`serving.ConnectionTable.crowded`):
        # then nothing waits for the pulls due (each post held keeps its connection, and the
        # fan-out waits for room: `release_now`)
        self.crowded: Callable[[], bool] = lambda: False
        self._syncing: set[asyncio.Task[None]] = set()
        self._writes: list[_Write] = []
        # agents' events that came while a sync ran: committed together once it ends
        self._held: list[_Write] = []
        # the agent that posted events last, when (monotonic), and when another one did before it
        self._last_poster = ""
        self._last_post_at = self._others_post_at = -math.inf
        self._releasing: asyncio.Task[None] | None = None
        # hop reports waiting for a group commit to ride (at most HOP_COMMIT_S)
        self._lazy: list[_Write] = []
        self._lazy_timer: asyncio.TimerHandle | None = None
        # when hop reports were first put off for the pulls due (None: none is)
        self._hops_put_off_at: float | None = None
        # (flag, execution id) queued and not committed yet: a hop is reported once, also when
        # two requests of the same turn see the flag unset
        self._flagging: set[tuple[Flag, int]] = set()
        self._committed = asyncio.Event()  # set by each group commit (for `settled`)

    def apply(self, work: WorkOut) -> list[int]:
        """A work pull came back: make the cache the NS's list; return the new execution ids."""
        new = self._store.reconcile(work.executions)
        if new:
            log.info("work from the NS: %d new executions %s", len(new), _ids(new))
        return new

    def cancel(self, work: WorkOut) -> list[str]:
        """Note the cancels a work pull brought; the computers that must hear of new ones."""
        if not work.cancel:
            return []
        new = self._store.add_cancels(work.cancel)
        if new:
            log.info("cancelled by the NS: %s", new)
        return self._store.computers_of(new)

    def cancels_for(self, computer: str) -> list[int]:
        """What `computer` must not start, or must stop: its cancelled unfinished executions."""
        return self._store.cancels_for(computer)

    def tickled(self, computer: str, first_sent: float) -> None:
        """A tasks tickle went to `computer`: its work not yet reported tickled is, now."""
        fresh = self._first("agent_tickled", self._store.pending_work(computer))
        self._hop("agent_tickled", fresh, at=first_sent)

    def pulled(self, computer: str, via: PullVia) -> list[CachedWork]:
        """`computer` pulled: its pending work; what it pulls the first time is reported pulled."""
        pending = [w for w in self._store.pending_work(computer) if self._pullable(w)]
        first = self._first("agent_pulled", pending)
        self._hop("agent_pulled", first, via=via)
        return pending

    def pulled_many(self, computers: list[str], via: PullVia) -> dict[str, list[ExecutionWork]]:
        """These computers pulled at once (long-polls woken together): as `pulled`, in one read
        of the cache and one commit of their `agent_pulled` events."""
        wanted = set(computers)
        pending = [
            w for w in self._store.pending_work() if w.computer in wanted and self._pullable(w)
        ]
        self._hop("agent_pulled", self._first("agent_pulled", pending), via=via)
        pulled: dict[str, list[ExecutionWork]] = {c: [] for c in computers}
        for w in pending:
            pulled[w.computer].append(w.work)
        return pulled

    async def take_events(self, computer: str, events: Sequence[Event]) -> list[str]:
        """Cache the status events `computer` reports, durably, for the NS; return their ids.

        An execution this task server does not hold is left to the NS; an event about another
        computer, about an execution cached for another computer, or of a kind only the task
        server reports is refused, and then none of the batch is cached.
        """
        for event in events:
            self._check(computer, event)
        now = time.time()
        cached = events  # the request's own, validated: stamped in place, not copied
        for e in cached:
            e.cached_at = now
        # durable before the answer: the agent drops its copy once we acknowledge
        new = await self._queue(
            computer, list(cached), [e.execution_id for e in cached if e.kind == "finished"]
        )
        for e in cached:
            if e.kind == "finished" and e.status is not None and e.event_id in new:
                self._metrics.executions_by(e.status).inc()
        return [e.event_id for e in cached]

    def _pullable(self, w: CachedWork) -> bool:
        """Not cancelled, and not finished by an event still to be committed."""
        finishing = ("done", w.execution_id) in self._flagging
        return not finishing and w.execution_id not in self._store.cancelled

    def _first(self, flag: Flag, work: list[CachedWork]) -> list[CachedWork]:
        """The work whose `flag` is neither set nor being set."""
        return [
            w for w in work if not getattr(w, flag) and (flag, w.execution_id) not in self._flagging
        ]

    def _check(self, computer: str, event: Event) -> None:
        if event.computer != computer:
            log.warning("agent %s sent event %s for computer %s: refused",
                        computer, event.event_id, event.computer)  # fmt: skip
            raise Refused(
                403,
                f"event {event.event_id} is for computer {event.computer!r}, not {computer!r}",
            )
        owner = self._store.work_owner(event.execution_id)
        if owner is not None and owner != computer:
            log.warning("agent %s sent event %s for %s's execution %d: refused",
                        computer, event.event_id, owner, event.execution_id)  # fmt: skip
            raise Refused(403, f"execution {event.execution_id} is not one of {computer!r}'s")
        if event.kind not in AGENT_EVENT_KINDS:
            raise Refused(
                422,
                f"event {event.event_id}: kind {event.kind!r} is reported by the task server,"
                " not by agents",
            )

    def _hop(
        self,
        kind: Literal["agent_tickled", "agent_pulled"],
        work: list[CachedWork],
        at: float | None = None,
        via: PullVia | None = None,
    ) -> None:
        """Report that `work` passed a hop of the task server's (kind: also its cache flag): in
        the next group commit, within HOP_COMMIT_S (see the module's doc)."""
        if not work:
            return
        now = time.time()
        stamp = now if at is None else at
        flagged = [w.execution_id for w in work]
        self._flagging.update((kind, eid) for eid in flagged)
        # read at once by the next requests (whether the agent has news, whom to tickle); the
        # row follows with the commit
        self._store.flag_held(kind, flagged)
        # its events are made at the commit, its rows noted now
        hops = [(w.execution_id, w.computer, stamp, now) for w in work]
        self._lazy.append(_Write([], kind, flagged, committed=None, hops=hops, via=via))
        if self._lazy_timer is None:
            self._lazy_timer = asyncio.get_running_loop().call_later(
                HOP_COMMIT_S, self._commit_lazy
            )

    def _commit_lazy(self) -> None:
        """The hop reports waited HOP_COMMIT_S: they commit now (with this turn's writes), or
        while pulls are due, HOP_COMMIT_S later again, `pulls_first_s` at most since the first
        put off (see the module's doc)."""
        self._lazy_timer = None
        if self._pulls_first():
            now = time.monotonic()
            if self._hops_put_off_at is None:
                self._hops_put_off_at = now
            if now - self._hops_put_off_at < self._pulls_first_s:
                loop = asyncio.get_running_loop()
                self._lazy_timer = loop.call_later(HOP_COMMIT_S, self._commit_lazy)
                return
        self._commit()

    @property
    def uncommitted(self) -> int:
        """Writes queued and not committed yet (hop reports waiting for a commit to ride, this
        turn's, agents' events held for the running sync or the pulls due)."""
        return len(self._lazy) + len(self._writes) + len(self._held)

    def flush(self) -> None:
        """Commit the hop reports waiting for a group commit now (the task server stops)."""
        self._commit(chunked=False)

    async def settled(self, within_s: float) -> bool:
        """Wait until nothing queued waits for its commit (True), or `within_s` passes (False):
        after a fan-out's pulls, its hop reports and held events are in the outbox then."""
        deadline = time.monotonic() + within_s
        while self.uncommitted and (left := deadline - time.monotonic()) > 0:
            self._committed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._committed.wait(), left)
        return not self.uncommitted

    async def _queue(self, computer: str, events: list[Event], finished: list[int]) -> set[str]:
        """Queue `computer`'s `events` for the NS and set `done` on the `finished` executions,
        in the group commit of this turn (or after the pulls due and the running sync, unless
        the agent is alone); count the events new to the outbox (a retried post counts once)
        and return their ids once committed."""
        write = _Write(events, "done", finished)
        self._flagging.update(("done", eid) for eid in finished)
        alone = self._alone(computer)
        syncing = self._wal_sync is not None and self._wal_sync.busy
        if (syncing or self._pulls_first()) and not alone:
            # committed when the pulls due are served and the running sync ends (module doc)
            self._held.append(write)
            if self._releasing is None:
                self._releasing = asyncio.get_running_loop().create_task(self._release_held())
        else:
            self._schedule(write)
        assert write.committed is not None
        return await asyncio.shield(write.committed)

    def _pulls_first(self) -> bool:
        """Whether writes wait for the pulls due: some are, and the connections are not crowded."""
        return self._pulls_due is not None and self._pulls_due.count > 0 and not self.crowded()

    def _alone(self, computer: str) -> bool:
        """Note `computer`'s post; whether it is alone: no other agent posted within
        ALONE_WINDOW_S, and no writes are held (see the module's doc)."""
        now = time.monotonic()
        if computer != self._last_poster:
            self._others_post_at, self._last_poster = self._last_post_at, computer
        self._last_post_at = now
        return not self._held and now - self._others_post_at > ALONE_WINDOW_S

    def _schedule(self, write: _Write) -> None:
        """`write` goes in this turn's group commit."""
        if not self._writes:
            asyncio.get_running_loop().call_soon(self._commit)
        self._writes.append(write)

    def release_now(self) -> None:
        """The agent API's connections are crowded: the writes held go in this turn's group
        commit, each answered once synced."""
        held, self._held = self._held, []
        for write in held:
            self._schedule(write)

    async def _release_held(self) -> None:
        """Once no tickled agent's pull is due (or `pulls_first_s` after the first was held)
        and the running sync ends, the held writes go in the next group commit (the first to
        start the next sync)."""
        try:
            if self._pulls_due is not None:
                await self._pulls_due.none_within(self._pulls_first_s)
            if self._wal_sync is not None:
                await self._wal_sync.idle()
        finally:
            self._releasing = None
            held, self._held = self._held, []
            for write in held:
                self._schedule(write)

    def _commit(self, chunked: bool = True) -> None:
        """Commit every write queued this turn: one outbox and one cache transaction; answer
        the agents' events once synced, the task server's own hop reports at once. `chunked`:
        COMMIT_MAX_WRITES at most, the rest in the next turn."""
        writes = self._lazy + self._writes  # the hops came first
        self._lazy = []
        # at most COMMIT_MAX_WRITES: the rest in the next turn's, which the writes queued
        # meanwhile join (the pulls waiting are served between)
        cut = COMMIT_MAX_WRITES if chunked else len(writes)
        writes, self._writes = writes[:cut], writes[cut:]
        if self._writes:
            asyncio.get_running_loop().call_soon(self._commit)
        self._committed.set()
        if not writes:  # taken by an earlier commit of this turn (HOP_COMMIT_S, `flush`)
            return
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        self._hops_put_off_at = None
        # synced when an agent's events are among them (it drops its copy once answered); the
        # task server's own hop reports alone are not (see the module's docstring)
        needs_sync = any(w.flag == "done" for w in writes)
        durable = needs_sync and self._wal_sync is None
        # hop reports alone ride with the agent's next event (see HOP_REPORTS_WAIT_S)
        within_s = None if needs_sync else HOP_REPORTS_WAIT_S
        # grouped by execution: a backlog goes to the NS execution by execution (see `Outbox`)
        bodies = [(e.event_id, _json(e), e.execution_id) for w in writes for e in w.made()]
        try:
            new = set(self._forwarder.queue_bodies(bodies, durable, within_s))
            flags: dict[str, list[int]] = defaultdict(list)
            for w in writes:
                flags[w.flag] += w.flagged
            self._store.mark_all(flags, durable)
        except Exception as exc:
            # the agents' posts hear of it; the hop reports, waited for by nobody, are logged
            for w in writes:
                if w.flag == "done":
                    w.tell(exc)
            if any(w.flag != "done" for w in writes):
                log.error("committing the task server's hop reports failed: %s", exc)
            return
        finally:
            for w in writes:
                self._flagging.difference_update((w.flag, eid) for eid in w.flagged)
        if durable or not needs_sync:
            self._settle(writes, new)
            return
        # the hop reports among them are answered now, as they would be alone: a pull committed
        # in the turn of agents' events waited for their sync (S5: 2,500 agents' pulls and events)
        hops = [w for w in writes if w.flag != "done"]
        if hops:
            self._settle(hops, new)
            writes = [w for w in writes if w.flag == "done"]
        task = asyncio.get_running_loop().create_task(self._sync_then_settle(writes, new))
        self._syncing.add(task)
        task.add_done_callback(self._syncing.discard)

    async def _sync_then_settle(self, writes: list[_Write], new: set[str]) -> None:
        assert self._wal_sync is not None
        try:
            await self._wal_sync.sync()
        except OSError as exc:
            log.error("syncing the task server's databases failed: %s", exc)
            for w in writes:
                w.tell(exc)
            return
        self._settle(writes, new)

    def _settle(self, writes: list[_Write], new: set[str]) -> None:
        """The writes are durable: answer them, and count their events new to the outbox."""
        counted: Counter[str] = Counter()
        seen: set[str] = set()  # an event posted twice in one commit (a retry) counts once
        for w in writes:
            mine = {e.event_id for e in w.events} & new
            counted.update(e.kind for e in w.events if e.event_id in mine - seen)
            seen |= mine
            w.tell(mine)
        for kind, n in counted.items():
            self._metrics.status_events_by(kind).inc(n)


def _json(event: Event) -> str:
    """An event as the outbox keeps it (both kinds write every field, in the same order)."""
    if isinstance(event, agentapi.StatusEvent):
        return agentapi.encode(event).decode()
    return event.model_dump_json()


# the ids a log line names at most: a run-now on 2,500 agents is one line, not 2,500 numbers
LOGGED_IDS = 8


def _ids(ids: list[int]) -> str:
    """`[1, 5, 9]`, or the first `LOGGED_IDS` and the last: `[1, 5, …, 2997]`."""
    if len(ids) <= LOGGED_IDS:
        return str(ids)
    return "[" + ", ".join(map(str, ids[: LOGGED_IDS - 1])) + f", …, {ids[-1]}]"
