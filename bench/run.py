"""`make bench`: the fleet-scale targets S1-S8 (issue 10), measured on loopback with real processes.

  S1 latency   one real agent, sequential run-nows: run-now → recorded, from the timelines
  S2 fleet     N simulated agents over 4 task servers, one run-now on all, NS on SQLite; the
               run-now meets the agents at rest (their connections closed), as on a site
  S3 fleet     the same, NS on PostgreSQL with 2 NS API processes (needs PostgreSQL's binaries)
  S4 ingest    NS status-event ingest through the real API, 4 clients posting batches of 500
  S5 pulls     one task server serving the pulls of all its agents tickled at once; then twice
               as many agents, more than its connections hold (none refused, all recorded)
  S6 register  N agents registering; then their reconnection after a restart of every task
               server (tickled agents across a run-now; N long-polling CEM agents), and the
               agents' and task servers' requests after an NS restart mid-run
  S7 agent     one real agent at rest: RSS and CPU over an idle minute; `tickle agent --help` time
  S8 curve     S2 at 1,000 / 2,500 / 5,000 / 10,000 agents
  longpoll     one task server holding N waiting long-polls (bench/longpoll.py), then work for all

S6's reconnection ratios are requests per second, peak / mean, counted in whole seconds from the
first request after the restart (or the NS's return); the mean is the requests over the time they
came in, from the first request to the end of the tenth of a second of the last (a last second
cut short by the run's end counts as the fraction it lasted). Counted before from the restart's
own clock, the first and last seconds were whatever fraction of a second the clock left: a
second half spent waiting for the restarted server, or the last straggler's, counted as a whole
second of few requests and lowered the mean. Starting the seconds at the first request is, if
anything, harder on the peak: the first second holds the first burst whole. All the requests of
a reconnection shorter than a second are one second of them (ratio 1): a peak counted per whole
second is not compared with a mean over a part of one.

The task servers' reconnection after an NS restart ends when each was served again: when the NS
answered (2xx) each kind of request the task server tried while it was down (its work pull, its
state reports, its event posts: what a reconnection has to catch up), the last of those; each task
server talks to the NS through a relay of its own that sees its requests and their answers.
Counted to the run's end before, its peak was the run's status events forwarded at the end
(nearly all of the last seconds' 26-49 requests were POST /api/ts/events, small batches once the
NS kept up, against 4-10 a second of the reconnection): traffic of the run, not of the
reconnection. The whole run's series,
by kind, stays in latest.md beside it.

Every figure comes from the components' own timestamps (the execution timelines) or from the
simulated agents' request counts, read after the run: nothing polls the NS while it is measured
but a scrape of its /metrics every half second in the fleet runs, to know when to read.
Writes bench/results/latest.json (every figure with its unit) and latest.md, and prints the
table of targets with now / target / met.

Options: --only PART[,PART] (latency|fleet|ingest|pulls|register|agent|curve|longpoll), --agents N,
--long-polls N, --runs N, --idle-s S, --curve N,N,.., --skip-postgres / --skip-sqlite (fleet: S2 or
S3 only), --keep DIR (every process's log and PostgreSQL's kept there); see --help.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import itertools
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import longpoll  # bench/longpoll.py, beside this file

from tickle import http
from tickle.console import timeline_times
from tickle.httpbase import CLIENT_KEEPALIVE_S
from tickle.messages import (
    TIMELINE_STEPS,
    AgentCredentials,
    AgentRegistration,
    EventAck,
    EventBatch,
    ExecutionOut,
    RunCreate,
    SettingsUpdate,
    StatusEvent,
    TaskCreate,
    TaskServerCredentials,
    TaskServerRegister,
)
from tickle.outbox import new_event_id
from tickle.testing.localfleet import NS_API_PORT, AgentSpec, LocalFleet, scrape_metric
from tickle.testing.simagents import PER_PROCESS, SimAgents, Trace

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PARTS = ("latency", "fleet", "ingest", "pulls", "register", "agent", "curve", "longpoll")
# the loopback /16s: servers 127.NET.N, simulated agents 127.NET+1 (tests use 127.61-127.184);
# --net moves both so two benchmarks can run side by side
NET = 0
# --keep DIR: the processes' directories (their logs) and PostgreSQL's log are kept there
KEEP: Path | None = None
# --spy DIR: py-spy profiles (raw collapsed stacks) of the fleet runs' servers and first simulator
SPY: Path | None = None
# --cores: the cores each fleet run's processes keep busy over the run (`_CoreSampler`)
CORES = False
CORES_EVERY_S = 0.025
CORES_BUCKETS = 10


def net(n: int) -> str:
    return f"127.{NET}.{n}"


def sim_net() -> str:
    return f"127.{NET + 1}"


DONE_DEADLINE_S = 600.0
# S6: simulated agents per simulator process. Each process costs ~0.5 CPU-s to start (its
# imports), which the servers' registrations wait behind on 2 cores: 40 processes for 10,000
# agents spent 20 CPU-s before registering anything. Registration is what S6 measures, so its
# agents run in fewer processes (their descriptors fit: the simulator raises its open-file limit)
REGISTER_PER_PROCESS = 1000
# The other fleet runs: simulated agents in this many processes (at least PER_PROCESS agents
# each), at every fleet size. Each process woken is a context switch on the 2 cores the servers
# share: with PER_PROCESS agents a process, 40 processes at 10,000 agents made every process
# spend ~20 % more CPU per agent than 4 did at 1,000 (S8's curve grew 1.3-1.4; the same code
# with 4 processes at every size: CPU per 1,000 agents 0.77 / 0.76 / 0.72 / 0.81, the curve 0.88)
SIM_PROCESSES = 4
# S8: every size runs this many times, in rounds, and counts its median run. A single run of
# 1,000 agents (~0.45 s) swung 0.39-0.52 s between runs minutes apart, one of 10,000 4.16-4.62:
# the curve's ratio was the runs' noise (0.85-1.11 for the same code)
CURVE_ROUNDS = 3
# how long the NS stays down in S6's NS restart (killed mid-run, started again after this)
NS_DOWN_S = 2.0
# A fleet run's run-now meets its agents idle, as on a site (their last request minutes old):
# every connection a registration left open closed (agents and task servers close theirs
# CLIENT_KEEPALIVE_S after their last request), so each agent's pull opens a new one. Run at
# once, the agents that registered last still had theirs: a run-now on 1,000 agents (registered
# in ~2 s) met warm connections, one on 10,000 (~20 s) cold ones, and S8's curve compared the
# two (5,000 agents, same minute: 5.2-5.7 s warm, 10.9-12.5 s cold; CPU per 1,000 agents 1.8-2.0
# vs 4.1-4.7 CPU-s).
IDLE_BEFORE_RUN_S = CLIENT_KEEPALIVE_S + 1.0


# --- figures and targets -------------------------------------------------------------------------


@dataclass
class Results:
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    md: list[str] = field(default_factory=list)

    def put(self, key: str, value: float | None, unit: str, what: str) -> None:
        self.figures[key] = {"value": value, "unit": unit, "what": what}

    def value(self, key: str) -> float | None:
        fig = self.figures.get(key)
        return None if fig is None else fig["value"]


@dataclass
class Target:
    id: str
    what: str
    target: str
    now: Callable[[Results], str]
    met: Callable[[Results], bool | None]


def _fmt(r: Results, key: str, digits: int = 1) -> str:
    v = r.value(key)
    return "—" if v is None else f"{v:,.{digits}f} {r.figures[key]['unit']}"


def _le(r: Results, key: str, bound: float) -> bool | None:
    v = r.value(key)
    return None if v is None else v <= bound


def _ge(r: Results, key: str, bound: float) -> bool | None:
    v = r.value(key)
    return None if v is None else v >= bound


def _all(*checks: bool | None) -> bool | None:
    """Met when every check is; not met when one is not; else not measured (None)."""
    if False in checks:
        return False
    return None if None in checks else True


def _ns_agents_met(r: Results) -> bool | None:
    """The agents after an NS restart: no herd when they had nothing left to send (their task
    servers held the whole run while the NS was down), else peak / mean ≤ 1.5."""
    if r.value("s6_ns_agents_after_return") == 0:
        return True
    return _le(r, "s6_ns_agents_peak_to_mean", 1.5)


def _ns_agents_fmt(r: Results) -> str:
    if r.value("s6_ns_agents_after_return") == 0:
        return "no agent requests"
    return _fmt(r, "s6_ns_agents_peak_to_mean", 2)


TARGETS = [
    Target("S1", "one agent, run-now → recorded (p50 / p99)", "≤ 10 ms / ≤ 25 ms",
           lambda r: f"{_fmt(r, 's1_p50_ms', 2)} / {_fmt(r, 's1_p99_ms', 2)}",
           lambda r: _all(_le(r, "s1_p50_ms", 10), _le(r, "s1_p99_ms", 25))),
    Target("S2", "run-now on N agents, 4 task servers, SQLite: all recorded", "≤ 10 s",
           lambda r: f"{_fmt(r, 's2_wall_s', 2)} ({_fmt(r, 's2_agents', 0)})",
           lambda r: _all(_le(r, "s2_wall_s", 10), _ge(r, "s2_agents", 10_000))),
    Target("S3", "the same on PostgreSQL, 2 NS API processes", "≤ 10 s",
           lambda r: f"{_fmt(r, 's3_wall_s', 2)} ({_fmt(r, 's3_agents', 0)})",
           lambda r: _all(_le(r, "s3_wall_s", 10), _ge(r, "s3_agents", 10_000))),
    Target("S4", "NS status-event ingest, SQLite / PostgreSQL", "≥ 20,000 events/s each",
           lambda r: f"{_fmt(r, 's4_sqlite_eps', 0)} / {_fmt(r, 's4_postgres_eps', 0)}",
           lambda r: _all(_ge(r, "s4_sqlite_eps", 20_000), _ge(r, "s4_postgres_eps", 20_000))),
    Target("S5", "one task server serving its agents' pulls", "≥ 5,000 pulls/s",
           lambda r: _fmt(r, "s5_pulls_per_s", 0),
           lambda r: _ge(r, "s5_pulls_per_s", 5_000)),
    Target("S6", "N agents registering; reconnection peak / mean: task-server restart "
                 "(tickled / long-polling agents); NS restart (agents / task servers)",
           "≤ 20 s; ≤ 1.5",
           lambda r: f"{_fmt(r, 's6_register_s', 1)} ({_fmt(r, 's6_agents', 0)}); "
                     f"TS restart {_fmt(r, 's6_peak_to_mean', 2)} (tickled) / "
                     f"{_fmt(r, 's6_lp_peak_to_mean', 2)} (long-polling); NS restart "
                     f"{_ns_agents_fmt(r)} / "
                     f"{_fmt(r, 's6_ns_ts_peak_to_mean', 2)}",
           lambda r: _all(_le(r, "s6_register_s", 20), _le(r, "s6_peak_to_mean", 1.5),
                          _ns_agents_met(r),
                          _le(r, "s6_ns_ts_peak_to_mean", 1.5), _le(r, "s6_lp_peak_to_mean", 1.5),
                          _ge(r, "s6_agents", 10_000))),
    Target("S7", "agent at rest: RSS, CPU (start-up of --help)", "≤ 30 MB, ≤ 0.1 %",
           lambda r: f"{_fmt(r, 's7_rss_mb', 1)}, {_fmt(r, 's7_cpu_percent', 3)} "
                     f"({_fmt(r, 's7_help_s', 2)})",
           lambda r: _all(_le(r, "s7_rss_mb", 30), _le(r, "s7_cpu_percent", 0.1))),
    Target("S8", "scaling curve: s per 1,000 agents, largest / smallest run", "≤ 1 (linear)",
           lambda r: _fmt(r, "s8_growth", 2),
           lambda r: _le(r, "s8_growth", 1.0)),
]  # fmt: skip


def targets_table(r: Results) -> list[str]:
    rows = ["| id | what | now | target | met |", "|---|---|---|---|---|"]
    for t in TARGETS:
        met = t.met(r)
        mark = "not measured" if met is None else "yes" if met else "no"
        rows.append(f"| {t.id} | {t.what} | {t.now(r)} | {t.target} | {mark} |")
    return rows


# --- helpers -------------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def hop_rows(executions: list[ExecutionOut]) -> list[str]:
    """p50/p99 of each hop (ms), from consecutive timeline steps."""
    rows = ["| hop | p50 (ms) | p99 (ms) |", "|---|---|---|"]
    for a, b in itertools.pairwise(TIMELINE_STEPS):
        deltas = []
        for e in executions:
            t = timeline_times(e)
            if t.get(a) is not None and t.get(b) is not None:
                deltas.append(((t[b] or 0) - (t[a] or 0)) * 1000)
        if deltas:
            rows.append(f"| {a} → {b} | {statistics.median(deltas):.2f} | {pct(deltas, 99):.2f} |")
    return rows


async def scrape(url: str, name: str) -> float:
    """The sum of one metric's samples on a component's /metrics (0 when absent or down)."""
    return await scrape_metric(url, name) or 0.0


async def wait_metric(urls: list[str], name: str, wanted: float, deadline_s: float) -> bool:
    """Scrape `name` (summed over `urls`) every 0.5 s until it reaches `wanted`."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if sum([await scrape(u, name) for u in urls]) >= wanted:
            return True
        await asyncio.sleep(0.5)
    return False


async def start_fleet(fleet: LocalFleet) -> None:
    """Start `fleet`; one that fails to start (a server that did not answer in time on a loaded
    machine) is stopped, not left running on the addresses the next run wants."""
    try:
        await fleet.start()
    except BaseException:
        await fleet.stop()
        raise


async def gather_limited(aws: Iterable[Awaitable[Any]], limit: int = 16) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(aw: Awaitable[Any]) -> Any:
        async with sem:
            return await aw

    return await asyncio.gather(*(one(aw) for aw in aws))


@contextlib.contextmanager
def postgres_or_none(r: Results, what: str) -> Iterator[Any]:
    """A private PostgreSQL server, or None (noted) when it cannot start here."""
    try:
        from tickle.testing.postgres import PostgresError, start_postgres
    except ImportError as exc:  # psycopg missing
        r.notes.append(f"{what}: not measured: {exc}")
        yield None
        return
    try:
        server = start_postgres(max_connections=400, statements=KEEP is not None)
    except PostgresError as exc:
        r.notes.append(f"{what}: not measured: {str(exc).splitlines()[0]}")
        yield None
        return
    try:
        yield server
    finally:
        if KEEP is not None:  # its directory goes with it: its log (lock waits, deadlocks) stays
            with contextlib.suppress(OSError):
                name = what.split()[0].lower()
                (KEEP / f"postgres-{name}.log").write_bytes(
                    (server.root / "postgres.log").read_bytes()
                )
        server.stop()


class RequestCounter:
    """A TCP relay in front of the NS that counts the HTTP requests sent through it (per tenth
    of a second, keyed like the simulated agents' counts: unix time * 10), for one task server.

    Each task server talks to the NS through its own (its `--ns-url`, `port`), so S6 sees their
    requests after an NS restart without the NS counting anything, and when each is answered
    again. A request is its request line's end (b" HTTP/1.1\r\n": a JSON body never holds a
    bare CRLF); its kind is its method and path (`kinds`); each answer's status line is matched
    to its connection's oldest request not answered yet (HTTP/1.1 answers in order), noted in
    `answers`. While the NS is down the relay still accepts, counts what the task server sends
    and closes: a retry is counted as a request.
    """

    MARK = b" HTTP/1.1\r\n"
    # a request line, after the last request's body (kept-alive: no CRLF between them)
    LINE = re.compile(rb"(GET|POST|PUT|PATCH|DELETE|HEAD) (/[^ ?]*)[^ ]* HTTP/1\.1\r\n")
    STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")

    def __init__(self, host: str, upstream: tuple[str, int], port: int = NS_API_PORT) -> None:
        self.host = host
        self.port = port
        self.upstream = upstream
        self.per_tenth: Counter[int] = Counter()
        # each kind of request (method and path): its counts by tenth of a second
        self.kinds: defaultdict[str, Counter[int]] = defaultdict(Counter)
        self.sent: list[tuple[float, str]] = []  # (unix time, request kind)
        self.answers: list[tuple[float, str, int]] = []  # (unix time, request kind, status)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        """Listen; return the URL the task server uses for the NS."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def tried(self, start: float, end: float) -> set[str]:
        """The kinds of request sent between `start` and `end`."""
        return {kind for at, kind in self.sent if start <= at < end}

    def served_again_at(self, killed_at: float, back_at: float) -> float | None:
        """When this task server was served again after the NS's return (`back_at`): the first
        success answered to each kind of request it tried while the NS was down (from
        `killed_at`), the last of those (none tried: its first success after the return);
        None: one kind never was."""
        firsts: dict[str, float] = {}
        for at, kind, status in self.answers:
            if at >= back_at and 200 <= status < 300 and kind not in firsts:
                firsts[kind] = at
        tried = self.tried(killed_at, back_at) - {"?"}
        if not tried:
            return min(firsts.values(), default=None)
        if any(kind not in firsts for kind in tried):
            return None
        return max(firsts[kind] for kind in tried)

    def _count(self, data: bytes) -> list[str]:
        if not (n := data.count(self.MARK)):
            return []
        now = time.time()
        tenth = int(now * 10)
        self.per_tenth[tenth] += n
        kinds = [f"{m[1].decode()} {m[2].decode()}" for m in self.LINE.finditer(data)]
        kinds += ["?"] * (n - len(kinds))  # a request line that began in an earlier read
        for kind in kinds:
            self.kinds[kind][tenth] += 1
            self.sent.append((now, kind))
        return kinds

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:  # the NS is down: count what the task server sends, then close
                with contextlib.suppress(OSError, TimeoutError):
                    self._count(await asyncio.wait_for(reader.read(65536), 2.0))
                return
            asked: deque[str] = deque()  # this connection's requests not answered yet
            try:
                await asyncio.gather(self._pipe(reader, up_writer, asked, requests=True),
                                     self._pipe(up_reader, writer, asked))  # fmt: skip
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        asked: deque[str],
        requests: bool = False,
    ) -> None:
        tail = b""
        keep = len(self.MARK) - 1
        try:
            while data := await reader.read(65536):
                if requests:  # a request line may straddle two reads
                    asked.extend(self._count(tail + data))
                else:
                    for m in self.STATUS.finditer(tail + data):
                        kind = asked.popleft() if asked else "?"
                        self.answers.append((time.time(), kind, int(m[1])))
                tail = data[-keep:]
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()  # one side ended: so does the other


def per_second_counts(per_tenth: Counter[int], start: float, end: float) -> list[int]:
    """Requests per second between `start` and `end`, in seconds counted from the first tenth of
    a second with requests (requests before `start` stay out) to the last (seconds without any in
    between count as 0); the last second may be cut short (see `active_s`). `per_tenth`: counts
    by unix time * 10.

    Seconds start at the first request, not at `start` (the restart): a second that began before
    the restarted server answered, or one cut by the end of the run, is not a second of requests,
    and a ratio over it measured where the clock happened to fall, not the reconnection."""
    tenths = _active_tenths(per_tenth, start, end)
    if not tenths:
        return []
    seconds: Counter[int] = Counter()
    for tenth in tenths:
        seconds[(tenth - tenths[0]) // 10] += per_tenth[tenth]
    return [seconds[s] for s in range(max(seconds) + 1)]


def _per_second(per_tenth: Counter[int], start: float, end: float) -> list[int]:
    """Counts per second of the clock from `start` (no alignment: series side by side)."""
    seconds: Counter[int] = Counter()
    for tenth, n in per_tenth.items():
        if start <= tenth / 10 < end:
            seconds[int(tenth / 10 - start)] += n
    return [seconds[s] for s in range(int(end - start) + 1)]


def active_s(per_tenth: Counter[int], start: float, end: float) -> float:
    """How long requests came between `start` and `end`: from the first tenth of a second with
    requests to the end of the last (0.0: none)."""
    tenths = _active_tenths(per_tenth, start, end)
    return (tenths[-1] - tenths[0] + 1) / 10 if tenths else 0.0


def _active_tenths(per_tenth: Counter[int], start: float, end: float) -> list[int]:
    return sorted(t for t, n in per_tenth.items() if n and start <= t / 10 < end)


def ratio(counts: list[int], span_s: float | None = None) -> float | None:
    """Peak / mean of per-second counts (None: no requests). The mean is the requests over
    `span_s`, the seconds they came in (`active_s`; default: one per count): a last second cut
    short by the run's end is a fraction of a second, not a whole one with few requests."""
    if not counts:
        return None
    # a peak counted per whole second is compared with a mean over at least one second: all
    # the requests within less than a second are that second's, a mean of as many (ratio 1)
    span = max(1.0, span_s) if span_s else float(len(counts))
    # nor below 1: requests spanning a whole second and a few tenths, those tenths dense with
    # them (a burst cut by the second's edge), gave a "peak" of 0.88 of the mean
    return max(1.0, max(counts) / (sum(counts) / span))


def reconnection_ratio(per_tenth: Counter[int], start: float, end: float) -> float | None:
    """S6's figure: requests per second between `start` and `end`, peak / mean."""
    return ratio(per_second_counts(per_tenth, start, end), active_s(per_tenth, start, end))


# --- S1: latency ---------------------------------------------------------------------------------


async def latency(root: Path, r: Results, runs: int, gap_s: float) -> None:
    fleet = LocalFleet(root, ["ts1"], [AgentSpec("bench-agent", ["ts1"])], net=net(9))
    await start_fleet(fleet)
    try:
        async with fleet.client() as ns:
            task = await ns.add_task(TaskCreate(name="bench-true", command=["true"]))
            ids = []
            pids = {name: proc.popen.pid for name, proc in fleet.procs.items() if proc.popen}
            cpu_before = {name: _proc_cpu_s(pid) for name, pid in pids.items()}
            # sequential: each run-now `gap_s` after the last (a run takes far less); nothing
            # reads the NS until the last run is done, then the timelines tell the times
            for _ in range(runs):
                run = await ns.run_now(RunCreate(task_id=task.id, computers=["bench-agent"]))
                ids.append(run.executions[0].id)
                await asyncio.sleep(gap_s)
            await wait_metric([fleet.ns_url], "tickle_executions_total", runs, 60)
            # each process's CPU over the runs (with its idle work and the metric scrapes)
            cpu_ms = {
                n: (_proc_cpu_s(pid) - cpu_before[n]) * 1000 / runs for n, pid in pids.items()
            }
            executions = [await ns.execution(i) for i in ids]
    finally:
        await fleet.stop()
    ok = [e for e in executions if e.status == "succeeded"]
    totals = []
    for e in ok:
        t = timeline_times(e)
        if t.get("recorded") and t.get("created"):
            totals.append(((t["recorded"] or 0) - (t["created"] or 0)) * 1000)
    overlapped = sum(1 for ms in totals if ms > gap_s * 1000)
    r.put("s1_runs", len(ok), "runs", "S1 run-nows that succeeded")
    r.put(
        "s1_via_tickle", sum(e.via == "tickle" for e in ok), "runs", "S1 runs delivered by tickle"
    )
    r.put("s1_p50_ms", statistics.median(totals), "ms", "S1 run-now → recorded, p50")
    r.put("s1_p99_ms", pct(totals, 99), "ms", "S1 run-now → recorded, p99")
    r.put("s1_max_ms", max(totals), "ms", "S1 run-now → recorded, max")
    r.md += [
        f"## S1: run-now → recorded, one agent, {runs} sequential runs {gap_s * 1000:.0f} ms apart",
        "",
        f"succeeded {len(ok)}/{runs}, via tickle {r.value('s1_via_tickle'):.0f}; "
        f"p50 {r.value('s1_p50_ms'):.2f} ms, p99 {r.value('s1_p99_ms'):.2f} ms, "
        f"max {r.value('s1_max_ms'):.2f} ms; runs longer than the gap: {overlapped}",
        "",
        *hop_rows(ok),
        "",
        "CPU per run (ms, over the runs, idle work included): "
        + ", ".join(f"{name} {ms:.2f}" for name, ms in cpu_ms.items()),
        "",
    ]
    for name, ms in cpu_ms.items():
        r.put(f"s1_cpu_{name.replace('-', '_')}_ms", ms, "ms", f"S1 CPU per run of {name}")


# --- S2, S3, S5, S6, S8: fleet runs --------------------------------------------------------------


@dataclass
class FleetRun:
    agents: int
    register_s: float
    accepted_ms: float
    wall_s: float | None  # run-now → the last finished event recorded (timelines)
    done: int
    executions: list[ExecutionOut]
    ts_metrics: dict[str, float]
    requests_per_tenth: Counter[int]
    restart_at: float | None = None
    done_at: float | None = None  # when the run-now's last execution was seen recorded
    ns_restart: NsRestart | None = None
    # CPU-seconds each server process spent while the agents registered (by process name)
    register_cpu_s: dict[str, float] = field(default_factory=dict)
    # CPU-seconds from the run-now until every execution was recorded: each server process (by
    # name), and "sim": the simulated agents' processes together
    run_cpu_s: dict[str, float] = field(default_factory=dict)
    traces: list[Trace] = field(default_factory=list)  # each simulated agent's first pull
    # --cores: (time, CPU-seconds spent so far by each group of processes), from the run-now on
    cores: list[tuple[float, dict[str, float]]] = field(default_factory=list)


@dataclass
class NsRestart:
    """S6's second run-now on all agents, the NS killed just after accepting it and started
    again `NS_DOWN_S` later: when, how it ended, and the task servers' requests per second."""

    killed_at: float
    started_at: float
    back_at: float  # when the restarted NS answered its health check: the reconnection starts
    done_at: float
    done: int
    ts_requests_per_tenth: Counter[int]
    ts_kinds: dict[str, Counter[int]] = field(default_factory=dict)  # RequestCounter.kinds
    # when every task server was served again (RequestCounter.served_again_at; None: one never
    # was), and what each tried while the NS was down
    ts_served_at: float | None = None
    ts_tried: list[list[str]] = field(default_factory=list)


async def fleet_run(
    root: Path,
    agents: int,
    task_servers: int,
    net: str,
    database_url: str | None = None,
    two_ns: bool = False,
    restart_task_servers: bool = False,
    restart_ns: bool = False,
    per_process: int | None = None,
    ts_extra: list[str] | None = None,
    db_pid: int | None = None,
) -> FleetRun:
    """Start an NS (two on PostgreSQL when `two_ns`), the task servers and `agents` simulated
    agents, then one run-now on all of them. `restart_task_servers`: the task servers are
    killed before the run-now and started again after it (the reconnection). `restart_ns`: then
    a second run-now, the NS killed just after accepting it and started again `NS_DOWN_S` later;
    the task servers reach the NS through a `RequestCounter`. `per_process`: simulated agents
    per simulator process (default: `sim_per_process`). `ts_extra`: more task-server options
    (bench's --ts-option).

    Also measures the CPU each process spent from the run-now until every execution was
    recorded (`FleetRun.run_cpu_s`); `db_pid`: the database server's, counted with its backends
    (as "db")."""
    ts_names = [f"ts{i + 1}" for i in range(task_servers)]
    ns_extra = ["--database-url", database_url] if database_url else []
    fleet = LocalFleet(root, ts_names, [], net=net, ns_extra=ns_extra, ts_extra=ts_extra)
    ns_urls = [fleet.ns_url]
    relays: list[RequestCounter] = []
    if restart_ns:  # each task server its own relay: when each is served again is known
        for i, name in enumerate(ts_names):
            relays.append(RequestCounter(f"{net}.9", (fleet.ns_host, NS_API_PORT), NS_API_PORT + i))
            fleet.set_ts_ns_url(name, await relays[-1].start())
    if two_ns:
        ns2_url = fleet.add_ns("ns2", f"{net}.200")
        ns_urls.append(ns2_url)
        for name in ts_names[1::2]:  # every other task server talks to the second NS
            fleet.set_ts_ns_url(name, ns2_url)
    await start_fleet(fleet)
    per_process = per_process or sim_per_process(agents)
    sims = SimAgents(fleet, agents, sim_net(), per_process=per_process)
    per_tenth: Counter[int] = Counter()
    restart_at = None
    run_cpu_s: dict[str, float] = {}
    servers = {name: p.popen.pid for name, p in fleet.procs.items() if p.popen is not None}
    cores: _CoreSampler | None = None  # made at the run-now
    try:
        cpu_before = {name: _proc_cpu_s(pid) for name, pid in servers.items()}
        register_s = await sims.start(deadline_s=DONE_DEADLINE_S)
        register_cpu_s = {name: _proc_cpu_s(pid) - cpu_before[name]
                          for name, pid in servers.items()}  # fmt: skip
        await asyncio.sleep(IDLE_BEFORE_RUN_S)  # the fleet at rest (see IDLE_BEFORE_RUN_S)
        async with fleet.client() as ns:
            task = await ns.add_task(TaskCreate(name="bench-fleet", command=["true"]))
            # before a restart's kill (the restarted task servers are other processes: their CPU
            # is not counted)
            run_pids = {**servers, **{f"sim{i}": p for i, p in enumerate(sims.pids)}}
            run_cpu = _CpuMeter(run_pids, db_pid)
            spies = _Spies(
                {**servers, "sim0": sims.pids[0]}, f"{root.name}-{agents}", restart_task_servers
            )
            cores = _CoreSampler(run_pids, restart_task_servers or restart_ns)
            if restart_task_servers:
                for name in ts_names:
                    fleet.kill(name)
            t0 = time.monotonic()
            run = await ns.run_now(RunCreate(task_id=task.id, computers=sims.names))
            accepted_ms = (time.monotonic() - t0) * 1000
            if restart_task_servers:
                restart_at = time.time()
                for name in ts_names:
                    fleet.spawn(name)
            await wait_metric(ns_urls, "tickle_executions_total", agents, DONE_DEADLINE_S)
            done_at = time.time()
            run_cpu_s = run_cpu.spent()
            spies.stop()
            await cores.stop()
            # the last events of the run (agent_pulled may trail finished): settle, then read
            await wait_metric(ns_urls, "tickle_status_events_total", 4 * agents, 30)
            run = await ns.run(run.id)
            ns_restart = None
            if restart_ns:
                ns_restart = await _across_ns_restart(fleet, ns, task.id, sims.names, relays)
        ts_metrics: dict[str, float] = {}
        for name in ts_names:
            for metric in ("tickle_tickles_resent_total", "tickle_pulls_total",
                           "tickle_status_events_total", "tickle_http_refused_total"):  # fmt: skip
                ts_metrics[metric] = ts_metrics.get(metric, 0) + await scrape(
                    fleet.ts_url(name), metric
                )
    finally:
        if cores is not None:  # (a run that failed before its end)
            await cores.stop()
        per_tenth = await sims.stop()
        await fleet.stop()
        for relay in relays:
            await relay.close()
    if KEEP is not None:  # each agent's own times beside the timelines, for a closer look
        (root / "agents.json").write_text(json.dumps({
            "traces": [dataclasses.astuple(t) for t in sims.traces],
            "timelines": {e.computer: timeline_times(e) for e in run.executions},
        }))  # fmt: skip
    done = sum(e.status == "succeeded" for e in run.executions)
    recorded = [timeline_times(e).get("recorded") for e in run.executions]
    created = min((timeline_times(e).get("created") or 0.0) for e in run.executions)
    wall = max(t for t in recorded if t) - created if done == agents else None
    return FleetRun(agents, register_s, accepted_ms, wall, done, run.executions, ts_metrics,
                    per_tenth, restart_at, done_at, ns_restart, register_cpu_s,
                    run_cpu_s, sims.traces, [] if cores is None else cores.samples)  # fmt: skip


async def _across_ns_restart(
    fleet: LocalFleet, ns: Any, task_id: int, names: list[str], relays: list[RequestCounter]
) -> NsRestart:
    """A run-now on all `names`, the NS killed as soon as it accepted it and started again
    `NS_DOWN_S` later; returns once every execution is recorded (or the deadline passed)."""
    run = await ns.run_now(RunCreate(task_id=task_id, computers=names))
    fleet.kill("ns")
    killed_at = time.time()
    await asyncio.sleep(NS_DOWN_S)
    fleet.spawn("ns")
    started_at = time.time()
    await fleet.wait_healthy(fleet.ns_url, "ns", 60)
    back_at = time.time()
    # the restarted NS counts from 0: wait until it recorded nearly all of this run (one
    # recorded before the kill is not counted again), then read the run until all are
    end = time.monotonic() + DONE_DEADLINE_S
    await wait_metric([fleet.ns_url], "tickle_executions_total", 0.98 * len(names),
                      DONE_DEADLINE_S)  # fmt: skip
    async with fleet.client() as fresh:  # the old client's kept-alive connection died with the NS
        while True:
            after = await fresh.run(run.id)
            done = sum(e.status == "succeeded" for e in after.executions)
            if done == len(names) or time.monotonic() > end:
                break
            await asyncio.sleep(1.0)
    per_tenth: Counter[int] = Counter()
    kinds: defaultdict[str, Counter[int]] = defaultdict(Counter)
    for relay in relays:
        per_tenth.update(relay.per_tenth)
        for kind, counts in relay.kinds.items():
            kinds[kind].update(counts)
    served = [relay.served_again_at(killed_at, back_at) for relay in relays]
    return NsRestart(killed_at, started_at, back_at, time.time(), done, per_tenth, dict(kinds),
                     None if None in served else max(s for s in served if s is not None),
                     [sorted(relay.tried(killed_at, back_at)) for relay in relays])  # fmt: skip


def fleet_md(title: str, f: FleetRun) -> list[str]:
    wall = "not all recorded" if f.wall_s is None else f"{f.wall_s:.2f} s"
    recorded = []
    for e in f.executions:
        t = timeline_times(e)
        if t.get("recorded") and t.get("created"):
            recorded.append((t["recorded"] or 0) - (t["created"] or 0))
    m = f.ts_metrics
    return [
        f"## {title}",
        "",
        f"registered in {f.register_s:.1f} s{_register_cpu(f)}; "
        f"idle {IDLE_BEFORE_RUN_S:.0f} s (every connection closed); "
        f"run-now accepted in {f.accepted_ms:.0f} ms; "
        f"{f.done}/{f.agents} succeeded; all recorded after {wall} "
        f"(per execution p50 {statistics.median(recorded):.2f} s, p99 {pct(recorded, 99):.2f} s)",
        f"task servers: {m.get('tickle_tickles_resent_total', 0):.0f} tickles resent, "
        f"{m.get('tickle_pulls_total', 0):.0f} agent pulls, "
        f"{m.get('tickle_status_events_total', 0):.0f} status events, "
        f"{m.get('tickle_http_refused_total', 0):.0f} requests refused",
        *_run_cpu(f),
        "",
        *hop_rows(f.executions),
        "",
        *agent_side_rows(f),
        *cores_rows(f),
    ]


CORE_GROUPS = ("NS", "task servers", "simulators")


def core_group(name: str) -> str:
    """A process's group in --cores' table: "ns", "ns2" the NS; "ts…" the task servers."""
    if name.startswith("ns"):
        return "NS"
    return "task servers" if name.startswith("ts") else "simulators"


def cores_rows(f: FleetRun, buckets: int = CORES_BUCKETS) -> list[str]:
    """--cores: the cores each group kept busy in each tenth of the run (run-now → the last
    record); nothing without --cores' samples."""
    created = [t for e in f.executions if (t := timeline_times(e).get("created"))]
    if len(f.cores) < 2 or f.wall_s is None or f.wall_s <= 0 or not created:
        return []
    return busy_cores_rows(f.cores, min(created), f.wall_s, buckets)


def busy_cores_rows(
    samples: list[tuple[float, dict[str, float]]], start: float, wall_s: float, buckets: int
) -> list[str]:
    """The table of `cores_rows`: each group's CPU-seconds over each of `buckets` equal parts of
    `wall_s` from `start`, per second (cores), the samples interpolated at the parts' edges."""
    times = [t for t, _ in samples]
    step = wall_s / buckets

    def spent(group: str, at: float) -> float:
        i = min(max(bisect.bisect_left(times, at), 1), len(times) - 1)
        (t0, a), (t1, b) = samples[i - 1], samples[i]
        x, y = a.get(group, 0.0), b.get(group, 0.0)
        return x if t1 <= t0 else x + (y - x) * (min(max(at, t0), t1) - t0) / (t1 - t0)

    rows = [
        "",
        f"busy cores over the run (--cores: sampled every {CORES_EVERY_S * 1000:.0f} ms), each "
        f"part of its {wall_s:.2f} s",
        "",
        "| from the run-now (s) | " + " | ".join(CORE_GROUPS) + " | all |",
        "|---|" + "---|" * (len(CORE_GROUPS) + 1),
    ]
    for k in range(buckets):
        a, b = start + k * step, start + (k + 1) * step
        busy = [(spent(g, b) - spent(g, a)) / step for g in CORE_GROUPS]
        cells = " | ".join(f"{c:.2f}" for c in busy)
        rows.append(f"| {a - start:.2f} to {b - start:.2f} | {cells} | {sum(busy):.2f} |")
    return rows


def agent_side_rows(f: FleetRun) -> list[str]:
    """The tickle → pull hop split by the simulated agents' own times: the first tickle sent
    (task server) → received (agent) → its pull sent (agent) → served (task server) → answered
    (agent); and how many tickles each agent received."""
    sent = {e.computer: timeline_times(e) for e in f.executions}
    spans: dict[str, list[float]] = {name: [] for name in AGENT_SIDE_SPANS}
    for t in f.traces:
        times = [sent.get(t.name, {}).get("agent_tickled"), t.tickled_at, t.pull_sent_at,
                 sent.get(t.name, {}).get("agent_pulled"), t.pulled_at]  # fmt: skip
        for name, a, b in zip(AGENT_SIDE_SPANS, times, times[1:], strict=False):
            if a is not None and b is not None:
                spans[name].append((b - a) * 1000)
    if not f.traces:
        return []
    tickles = [t.tickles for t in f.traces]
    rows = ["| agent_tickled → agent_pulled, the agents' side | p50 (ms) | p99 (ms) |",
            "|---|---|---|"]  # fmt: skip
    for name, values in spans.items():
        if values:
            rows.append(f"| {name} | {statistics.median(values):.2f} | {pct(values, 99):.2f} |")
    rows += ["", f"tasks tickles received per agent: mean {statistics.mean(tickles):.2f}, "
             f"max {max(tickles)}; agents tickled more than once: "
             f"{sum(n > 1 for n in tickles)}", ""]  # fmt: skip
    return rows


AGENT_SIDE_SPANS = (
    "tickle sent → received",
    "received → pull sent",
    "pull sent → served (task server)",
    "served → answer received",
)


def _run_cpu(f: FleetRun) -> list[str]:
    """The processes' CPU-seconds per 1,000 agents over the run (none after a restart)."""
    if not f.run_cpu_s:
        return []
    parts = ", ".join(f"{name} {s / f.agents * 1000:.2f}" for name, s in f.run_cpu_s.items())
    total = sum(f.run_cpu_s.values()) / f.agents * 1000
    return [f"CPU-seconds per 1,000 agents, run-now → all recorded: {parts} (total {total:.2f})"]


def _cpu_per_k(f: FleetRun) -> str:
    """The run's CPU-seconds per 1,000 agents: NS, task servers together, simulated agents."""
    if not f.run_cpu_s:
        return "—"
    per_k = {name: s / f.agents * 1000 for name, s in f.run_cpu_s.items()}
    ts = sum(s for name, s in per_k.items() if name.startswith("ts"))
    return (f"{per_k.get('ns', 0.0):.2f}, {ts:.2f}, {per_k.get('sim', 0.0):.2f} "
            f"({sum(per_k.values()):.2f})")  # fmt: skip


def register_cpu(f: FleetRun) -> tuple[float, float]:
    """CPU-seconds per 1,000 registrations: the NS's (both on PostgreSQL), the task servers'."""
    ns = sum(s for name, s in f.register_cpu_s.items() if name.startswith("ns"))
    ts = sum(s for name, s in f.register_cpu_s.items() if not name.startswith("ns"))
    return ns / f.agents * 1000, ts / f.agents * 1000


def _register_cpu(f: FleetRun) -> str:
    if not f.register_cpu_s:
        return ""
    ns, ts = register_cpu(f)
    return f" (CPU per 1,000 registrations: NS {ns:.2f} s, task servers {ts:.2f} s)"


class _CpuMeter:
    """CPU-seconds processes spend from now on (one that has ended counts what it had spent);
    those named "sim…" are summed as "sim"."""

    def __init__(self, pids: dict[str, int], db_pid: int | None = None) -> None:
        self.pids = pids
        self.before = {name: _proc_cpu_s(pid) for name, pid in pids.items()}
        self.db_pid = db_pid
        self.db_before = _tree_cpu_s(db_pid)

    def spent(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                key = "sim" if name.startswith("sim") else name
                out[key] = out.get(key, 0.0) + _proc_cpu_s(pid) - self.before[name]
        db = _tree_cpu_s(self.db_pid)
        if db is not None and self.db_before is not None:
            out["db"] = db - self.db_before
        return out


def _run_s(pid: int) -> float | None:
    """CPU-seconds a process's threads have run (schedstat, in ns: finer than /proc/<pid>/stat's
    clock ticks); None once it has ended."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                total += int((task / "schedstat").read_text().split()[0])
    except OSError:
        return None
    return total / 1e9


class _CoreSampler:
    """--cores: the CPU-seconds each group of processes (`core_group`) has spent, every
    CORES_EVERY_S from now until `stop` (in `samples`); nothing without --cores, or across a
    restart (the restarted processes are others)."""

    def __init__(self, pids: dict[str, int], restart: bool) -> None:
        self.pids = pids
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._base: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        if CORES and not restart:
            self._take()  # now: the run-now's
            self._task = asyncio.create_task(self._run())

    def _take(self) -> None:
        now, spent = time.time(), defaultdict(float)
        for name, pid in self.pids.items():
            s = _run_s(pid)
            if s is not None:
                spent[core_group(name)] += s - self._base.setdefault(name, s)
        self.samples.append((now, dict(spent)))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(CORES_EVERY_S)
            self._take()

    async def stop(self) -> None:
        """The last sample (at once again: nothing more)."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        self._take()


class _Spies:
    """--spy DIR: py-spy records each process (raw collapsed stacks, idle frames left out) from
    now until `stop`, into DIR/<label>-<name>.txt (label: the run's directory and agent count);
    nothing without --spy, or across a restart (the restarted processes are others)."""

    def __init__(self, pids: dict[str, int], label: str, restart: bool) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        if SPY is None or restart:
            return
        spy = Path(sys.executable).parent / "py-spy"
        for name, pid in pids.items():
            out = SPY / f"{label}-{name}.txt"
            self.procs.append(subprocess.Popen(
                [str(spy), "record", "--format", "raw", "--rate", "250", "--nonblocking",
                 "--pid", str(pid), "--output", str(out)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def pulls_per_s(executions: list[ExecutionOut]) -> float | None:
    """Agent pulls served per second: executions / (last agent_pulled - first agent_tickled)."""
    tickled = [t for e in executions if (t := timeline_times(e).get("agent_tickled"))]
    pulled = [t for e in executions if (t := timeline_times(e).get("agent_pulled"))]
    if not tickled or not pulled:
        return None
    span = max(pulled) - min(tickled)
    return len(pulled) / span if span > 0 else None


async def fleet(
    root: Path,
    r: Results,
    agents: int,
    postgres: bool = True,
    sqlite: bool = True,
    ts_extra: list[str] | None = None,
) -> None:
    if sqlite:
        f = await fleet_run(root / "sqlite", agents, 4, net(10), ts_extra=ts_extra)
        r.put("s2_agents", agents, "agents", "S2 simulated agents (4 task servers, SQLite)")
        r.put("s2_wall_s", f.wall_s, "s", "S2 run-now → every status event recorded")
        r.put("s2_resent", f.ts_metrics.get("tickle_tickles_resent_total"), "tickles",
              "S2 tickles the task servers resent")  # fmt: skip
        r.put("s2_pulls", f.ts_metrics.get("tickle_pulls_total"), "pulls", "S2 agent pulls")
        r.md += fleet_md(f"S2: run-now on {agents} agents over 4 task servers, NS on SQLite", f)
    else:
        r.notes.append("S2: not measured: --skip-sqlite")
    if not postgres:
        r.notes.append("S3: not measured: --skip-postgres")
        return
    with postgres_or_none(r, "S3") as pg:
        if pg is None:
            return
        url = pg.create_database("bench_s3")
        f = await fleet_run(
            root / "postgres",
            agents,
            4,
            net(11),
            url,
            two_ns=True,
            db_pid=pg.process.pid,
            ts_extra=ts_extra,
        )
        if KEEP is not None:  # what PostgreSQL spent its time on
            (KEEP / "postgres-s3-statements.txt").write_text(
                "calls | total ms | rows | statement\n"
                + "".join(" | ".join(map(str, row)) + "\n" for row in pg.statements("bench_s3"))
            )
        r.put("s3_agents", agents, "agents", "S3 simulated agents (4 task servers, PostgreSQL)")
        r.put("s3_wall_s", f.wall_s, "s", "S3 run-now → every status event recorded")
        r.md += fleet_md(
            f"S3: run-now on {agents} agents over 4 task servers, NS on PostgreSQL "
            "(2 NS API processes, 2 task servers on each)", f
        )  # fmt: skip


async def pulls(root: Path, r: Results, agents: int, ts_extra: list[str]) -> None:
    f = await fleet_run(root, agents, 1, net(12), ts_extra=ts_extra)
    r.put("s5_agents", agents, "agents", "S5 agents of the one task server")
    r.put("s5_pulls_per_s", pulls_per_s(f.executions), "pulls/s",
          "S5 pulls served: agents / (last agent_pulled - first agent_tickled)")  # fmt: skip
    cpu = {name: s / agents * 1e6 for name, s in f.run_cpu_s.items()}
    r.put("s5_ts_cpu_us", cpu.get("ts1"), "CPU-µs",
          "S5 task server CPU per agent (its pull and its events), run-now → all recorded")  # fmt: skip
    r.put("s5_sim_cpu_us", cpu.get("sim"), "CPU-µs",
          "S5 simulated agents' CPU per agent (tickle, pull, events)")  # fmt: skip
    r.put("s5_ns_cpu_us", cpu.get("ns"), "CPU-µs", "S5 NS CPU per agent's execution")
    r.md += fleet_md(f"S5: one task server, {agents} agents tickled at once", f)
    r.md += [
        "CPU per agent from the run-now until all recorded: "
        + ", ".join(f"{name} {us:.0f} µs" for name, us in sorted(cpu.items())),
        "",
    ]
    # twice as many agents on the one task server: more than its connections hold (4,096 by
    # default, crowded at 3,072); a fan-out that met a full table had pulls refused (503)
    crowd = 2 * agents
    f = await fleet_run(root / "crowd", crowd, 1, net(19), ts_extra=ts_extra)
    r.put("s5_crowd_agents", crowd, "agents", "S5 beyond the cap: agents of the one task server")
    r.put("s5_crowd_wall_s", f.wall_s, "s", "S5 beyond the cap: run-now → all recorded")
    r.put("s5_crowd_pulls_per_s", pulls_per_s(f.executions), "pulls/s",
          "S5 beyond the cap: pulls served")  # fmt: skip
    r.put("s5_crowd_refused", f.ts_metrics.get("tickle_http_refused_total"), "requests",
          "S5 beyond the cap: requests refused or connections closed for room (503, evicted)")  # fmt: skip
    r.md += fleet_md(
        f"S5 beyond the connection cap: one task server, {crowd} agents tickled at once", f
    )  # fmt: skip


async def register(root: Path, r: Results, agents: int, ts_extra: list[str] | None = None) -> None:
    f = await fleet_run(root, agents, 4, net(13), restart_task_servers=True, restart_ns=True,
                        per_process=REGISTER_PER_PROCESS, ts_extra=ts_extra)  # fmt: skip
    r.put("s6_agents", agents, "agents", "S6 agents registering (4 task servers)")
    r.put("s6_register_s", f.register_s, "s", "S6 every agent registered")
    ns_cpu, ts_cpu = register_cpu(f)
    r.put("s6_register_ns_cpu_s_per_1k", ns_cpu, "CPU-s", "S6 the NS's CPU per 1,000 registrations")
    r.put("s6_register_ts_cpu_s_per_1k", ts_cpu, "CPU-s",
          "S6 the task servers' CPU (all 4) per 1,000 registrations")  # fmt: skip
    assert f.restart_at is not None
    assert f.done_at is not None
    counts = per_second_counts(f.requests_per_tenth, f.restart_at, f.done_at)
    r.put("s6_peak_to_mean", reconnection_ratio(f.requests_per_tenth, f.restart_at, f.done_at),
          "ratio",
          "S6 reconnection after a task-server restart: agents' requests per second, peak / mean")  # fmt: skip
    r.put("s6_reconnect_s", active_s(f.requests_per_tenth, f.restart_at, f.done_at), "s",
          "S6 reconnection: seconds with agent requests")  # fmt: skip
    md = [
        *fleet_md(
            f"S6: {agents} agents registering, then run-now across a restart of all 4 task servers",
            f,
        ),
        f"agents' requests per second after the task servers' restart: {counts}",
        "",
    ]
    n = f.ns_restart
    if n is None:
        r.notes.append("S6 NS restart: not measured")
    else:
        # the reconnection is what comes after the NS is back: the seconds it is down (when the
        # task servers can send it nothing, and the agents run what their task servers hold)
        # are no part of it; the whole run from the kill is printed for reference
        agent_counts = per_second_counts(f.requests_per_tenth, n.back_at, n.done_at)
        # the task servers' reconnection: from the NS's return until each was answered again
        # what it tried while the NS was down (not the run's status events they forward after)
        ts_end = n.ts_served_at if n.ts_served_at is not None else n.done_at
        ts_counts = per_second_counts(n.ts_requests_per_tenth, n.back_at, ts_end)
        agents_ratio = reconnection_ratio(f.requests_per_tenth, n.back_at, n.done_at)
        r.put("s6_ns_agents_peak_to_mean", agents_ratio, "ratio",
              "S6 NS restart mid-run: agents' requests per second from the NS's return to the "
              "run's end, peak / mean (none: the agents had nothing left to do)")  # fmt: skip
        r.put("s6_ns_agents_after_return", sum(agent_counts), "requests",
              "S6 NS restart mid-run: agents' requests from the NS's return to the run's end")  # fmt: skip
        ts_ratio = reconnection_ratio(n.ts_requests_per_tenth, n.back_at, ts_end)
        r.put("s6_ns_ts_peak_to_mean", ts_ratio, "ratio",
              "S6 NS restart mid-run: task servers' requests to the NS per second from the NS's "
              "return until each was answered again what it tried while the NS was down, "
              "peak / mean")  # fmt: skip
        r.put("s6_ns_ts_reconnect_s", ts_end - n.back_at, "s",
              "S6 NS restart: from the NS's return until every task server was served again")  # fmt: skip
        if n.ts_served_at is None:
            r.notes.append("S6 NS restart: a task server was not served again before the run's "
                           "end: its ratio counts to the end")  # fmt: skip
        r.put("s6_ns_down_s", n.back_at - n.killed_at, "s",
              "S6 NS restart: from the kill until the restarted NS answered")  # fmt: skip
        r.put("s6_ns_done", n.done, "executions",
              "S6 NS restart: executions of the second run-now that succeeded")  # fmt: skip
        r.put("s6_ns_recorded_s", n.done_at - n.killed_at, "s",
              "S6 NS restart: from the kill until the restarted NS recorded every execution")  # fmt: skip
        md += [
            f"### NS restart: run-now on all {agents}, the NS killed once it accepted it, started "
            f"again {NS_DOWN_S:.0f} s later",
            "",
            f"{n.done}/{agents} succeeded; every execution recorded "
            f"{n.done_at - n.killed_at:.1f} s after the kill",
            f"the NS answered again {n.back_at - n.killed_at:.1f} s after the kill",
            f"agents' requests per second from the NS's return: {agent_counts}",
            f"task servers' requests to the NS per second from the NS's return until each "
            f"was served again ({ts_end - n.back_at:.1f} s; what each tried while the NS was "
            f"down: {n.ts_tried}): {ts_counts}",
            "task servers' requests to the NS per second from the NS's return to the run's "
            f"end: {per_second_counts(n.ts_requests_per_tenth, n.back_at, n.done_at)}",
            "agents' / task servers' requests per second from the kill: "
            f"{per_second_counts(f.requests_per_tenth, n.killed_at, n.done_at)} / "
            f"{per_second_counts(n.ts_requests_per_tenth, n.killed_at, n.done_at)}",
            "task servers' requests to the NS per second from the kill, by kind: "
            + "; ".join(
                f"{kind} {_per_second(c, n.killed_at, n.done_at)}"
                for kind, c in sorted(n.ts_kinds.items())
            ),
            "",
        ]
    lp_ratio, counts, reconnect_s, lp_register_s = await long_poll_restart(
        root / "long-poll", agents
    )
    r.put("s6_lp_peak_to_mean", lp_ratio, "ratio",
          "S6 long-polling (CEM) agents reconnecting after a restart of every task server: their "
          "requests per second from the kill until every long-poll waits again, peak / mean")  # fmt: skip
    r.put("s6_lp_reconnect_s", reconnect_s, "s",
          "S6 long-polling agents: from the task servers' kill until every long-poll waits again")  # fmt: skip
    md += [
        f"### {agents} long-polling (CEM) agents, every task server killed and started again",
        "",
        f"registered in {lp_register_s:.1f} s; every long-poll waiting again {reconnect_s:.1f} s "
        f"after the kill",
        f"agents' requests per second from the kill: {counts}",
        "",
    ]
    r.md += md


async def long_poll_restart(
    root: Path, agents: int
) -> tuple[float | None, list[int], float, float]:
    """`agents` simulated CEM agents holding long-polls (the NS's `long_poll` on) over 4 task
    servers, every task server killed and started again at once: the agents' requests per second
    from the kill until every long-poll waits again, peak / mean, and the counts; also the
    seconds that took, and the register time."""
    ts_names = [f"ts{i + 1}" for i in range(4)]
    fleet = LocalFleet(root, ts_names, [], net=net(18))
    await start_fleet(fleet)
    sims = SimAgents(fleet, agents, sim_net(), long_poll=True)
    ts_urls = [fleet.ts_url(name) for name in ts_names]
    metric = "tickle_long_polls_waiting"
    try:
        async with fleet.client() as ns:  # the task servers have it before any agent long-polls
            await ns.update_settings(SettingsUpdate(long_poll=True))
        register_s = await sims.start(deadline_s=DONE_DEADLINE_S)
        if not await wait_metric(ts_urls, metric, agents, DONE_DEADLINE_S):
            raise RuntimeError(f"not all {agents} long-polls waiting")
        for name in ts_names:
            fleet.kill(name)
        killed_at = time.time()
        for name in ts_names:
            fleet.spawn(name)
        if not await wait_metric(ts_urls, metric, agents, DONE_DEADLINE_S):
            raise RuntimeError(f"not all {agents} long-polls waiting again after the restart")
        done_at = time.time()
    finally:
        per_tenth = await sims.stop()
        await fleet.stop()
    return (reconnection_ratio(per_tenth, killed_at, done_at),
            per_second_counts(per_tenth, killed_at, done_at), done_at - killed_at,
            register_s)  # fmt: skip


def median_run(runs: list[FleetRun]) -> FleetRun:
    """The run of the median time (of an even count, the quicker of the two in the middle); a
    run that did not record everything counts as the slowest."""
    ordered = sorted(runs, key=lambda f: f.wall_s if f.wall_s is not None else math.inf)
    return ordered[(len(ordered) - 1) // 2]


def sim_per_process(agents: int) -> int:
    """Simulated agents per simulator process in a fleet run: `SIM_PROCESSES` processes (one
    per task server of 4), at least PER_PROCESS agents each."""
    return max(PER_PROCESS, -(-agents // SIM_PROCESSES))


async def curve(root: Path, r: Results, sizes: list[int], rounds: int = CURVE_ROUNDS) -> None:
    """S8: a fleet run at each size, in `rounds` rounds of every size (a slower minute of the
    host falls on every size alike); each size's figure is its median run."""
    runs: dict[int, list[FleetRun]] = {n: [] for n in sizes}
    for i in range(rounds):
        for n in sizes:
            runs[n].append(await fleet_run(root / f"{n}-{i + 1}", n, 4, net(14)))
    rows = [
        "| agents | all recorded (s): median (each run) | s per 1,000 agents | CPU-s per 1,000 "
        "agents, the median run: ns, task servers, sim (total) |",
        "|---|---|---|---|",
    ]
    per_k = []
    for n in sizes:
        walls = [f.wall_s for f in runs[n]]
        each = ", ".join("—" if w is None else f"{w:.2f}" for w in walls)
        if None in walls:
            r.put(f"s8_{n}_wall_s", None, "s", f"S8 run-now on {n} agents → all recorded")
            rows.append(f"| {n:,} | not all recorded ({each}) | — | — |")
            continue
        median = median_run(runs[n])
        wall = median.wall_s or 0.0
        r.put(f"s8_{n}_wall_s", wall, "s",
              f"S8 run-now on {n} agents → all recorded (median of {len(walls)} runs)")  # fmt: skip
        per_k.append(wall / n * 1000)
        rows.append(f"| {n:,} | {wall:.2f} ({each}) | {per_k[-1]:.2f} | {_cpu_per_k(median)} |")
    growth = per_k[-1] / per_k[0] if len(per_k) == len(sizes) and len(per_k) > 1 else None
    r.put("s8_growth", growth, "ratio", "S8 seconds per 1,000 agents, largest run / smallest")
    r.md += [f"## S8: scaling curve (4 task servers, SQLite; {rounds} rounds)", "", *rows, ""]
    for n in sizes:
        if CORES and None not in (f.wall_s for f in runs[n]):
            r.md += [f"{n:,} agents, the median run:", *cores_rows(median_run(runs[n])), ""]


# --- S4: ingest ----------------------------------------------------------------------------------


@dataclass
class Ingest:
    """What S4 measured: events/s, and CPU-seconds per 10,000 events of the NS process and of
    the database server (PostgreSQL's processes; None on SQLite, inside the NS)."""

    eps: float
    ns_cpu_s: float
    db_cpu_s: float | None


def ingest_events(names: list[str], executions: dict[str, int]) -> list[StatusEvent]:
    """The four status events of each computer's execution, as its agent and task server send
    them: ids made as the agents make them (`new_event_id`, version 7, in time order: the NS's
    event-id index takes them at one end; random version 4 ids, which the bench sent before,
    dirtied a page anywhere in it per event and cost the NS a quarter more CPU per event)."""
    events = []
    for name in names:
        for kind in ("agent_tickled", "agent_pulled", "started", "finished"):
            extra: dict[str, Any] = (
                {"status": "succeeded", "exit_code": 0} if kind == "finished" else {}
            )
            events.append(StatusEvent(event_id=new_event_id(), execution_id=executions[name],
                                      computer=name, kind=kind, at=time.time(),
                                      cached_at=time.time(), **extra))  # fmt: skip
    return events


async def ingest_one(root: Path, net: str, database_url: str | None, executions: int,
                     clients: int, batch: int, db_pid: int | None = None) -> Ingest:  # fmt: skip
    """Events/s the NS records from `clients` task servers posting batches at once, and the CPU
    they cost (`db_pid`: the database server's, its processes counted with it)."""
    fleet = LocalFleet(root, [], [], net=net,
                       ns_extra=["--database-url", database_url] if database_url else [])  # fmt: skip
    await start_fleet(fleet)
    try:
        async with http.client_session(timeout_s=120) as session:
            tokens: list[str] = []
            computers: list[list[str]] = []
            for c in range(clients):
                creds = await http.request(
                    session, "POST", fleet.ns_url + "/api/ts/register",
                    body=TaskServerRegister(enrollment_secret=fleet.enrollment_secret,
                                            name=f"ingest{c}", tickle_host=f"{net}.250",
                                            tickle_port=50199, api_url=f"http://{net}.250:1"),
                    answer=TaskServerCredentials,
                )  # fmt: skip
                tokens.append(creds.token)
                names = [f"ing-{c}-{i:05d}" for i in range(executions // clients)]
                computers.append(names)
                await gather_limited(
                    http.request(session, "POST", fleet.ns_url + "/api/ts/agents/register",
                                 body=AgentRegistration(name=name), answer=AgentCredentials,
                                 token=creds.token)
                    for name in names
                )  # fmt: skip
            async with fleet.client() as ns:
                task = await ns.add_task(TaskCreate(name="ingest", command=["true"]))
                run = await ns.run_now(
                    RunCreate(task_id=task.id, computers=[n for c in computers for n in c])
                )
            by_computer = {e.computer: e.id for e in run.executions}
            bodies: list[list[bytes]] = []
            for c in range(clients):
                events = ingest_events(computers[c], by_computer)
                bodies.append([
                    EventBatch(events=events[i : i + batch]).model_dump_json().encode()
                    for i in range(0, len(events), batch)
                ])  # fmt: skip

            async def post(c: int) -> int:
                accepted = 0
                headers = {"Authorization": f"Bearer {tokens[c]}",
                           "Content-Type": "application/json"}  # fmt: skip
                for body in bodies[c]:
                    async with session.post(fleet.ns_url + "/api/ts/events", data=body,
                                            headers=headers) as resp:  # fmt: skip
                        raw = await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"ingest post: HTTP {resp.status}: {raw[:200]!r}")
                        accepted += len(EventAck.model_validate_json(raw).accepted)
                return accepted

            ns_pid = fleet.procs["ns"].popen.pid  # type: ignore[union-attr]
            ns0, db0 = _proc_cpu_s(ns_pid), _tree_cpu_s(db_pid)
            t0 = time.monotonic()
            accepted = sum(await asyncio.gather(*(post(c) for c in range(clients))))
            elapsed = time.monotonic() - t0
            per_10k = 10_000 / max(1, accepted)
            ns_cpu = (_proc_cpu_s(ns_pid) - ns0) * per_10k
            db1 = _tree_cpu_s(db_pid)
            db_cpu = None if db0 is None or db1 is None else (db1 - db0) * per_10k
            return Ingest(accepted / elapsed, ns_cpu, db_cpu)
    finally:
        await fleet.stop()


async def ingest(
    root: Path, r: Results, executions: int, clients: int = 4, batch: int = 500
) -> None:
    got = await ingest_one(root / "sqlite", net(15), None, executions, clients, batch)
    r.put(
        "s4_sqlite_eps",
        got.eps,
        "events/s",
        f"S4 ingest, SQLite ({clients} clients, batches of {batch})",
    )
    r.put("s4_sqlite_ns_cpu", got.ns_cpu_s, "CPU-s per 10,000 events", "S4 SQLite: the NS's CPU")
    lines = [f"SQLite: {got.eps:,.0f} events/s (NS {got.ns_cpu_s:.3f} CPU-s per 10,000 events)"]
    with postgres_or_none(r, "S4 PostgreSQL") as pg:
        if pg is not None:
            url = pg.create_database("bench_s4")
            got = await ingest_one(root / "postgres", net(16), url, executions, clients, batch,
                                   db_pid=pg.process.pid)  # fmt: skip
            r.put("s4_postgres_eps", got.eps, "events/s",
                  f"S4 ingest, PostgreSQL ({clients} clients, batches of {batch})")  # fmt: skip
            r.put("s4_postgres_ns_cpu", got.ns_cpu_s, "CPU-s per 10,000 events",
                  "S4 PostgreSQL: the NS's CPU")  # fmt: skip
            r.put("s4_postgres_db_cpu", got.db_cpu_s, "CPU-s per 10,000 events",
                  "S4 PostgreSQL: PostgreSQL's CPU (all its processes)")  # fmt: skip
            lines.append(
                f"PostgreSQL: {got.eps:,.0f} events/s (NS {got.ns_cpu_s:.3f}, PostgreSQL "
                f"{got.db_cpu_s or 0:.3f} CPU-s per 10,000 events)"
            )
    r.md += [
        f"## S4: NS status-event ingest, {4 * executions:,} events from {clients} task-server "
        f"clients in batches of {batch}",
        "",
        "; ".join(lines),
        "",
    ]


# --- long-polls -----------------------------------------------------------------------------------


async def long_polls(root: Path, r: Results, count: int) -> None:
    """One task server holding `count` waiting long-polls, then work for all (bench/longpoll.py)."""
    r.md += [*await longpoll.measure(root, count), ""]


# --- S7: the agent at rest -----------------------------------------------------------------------


def _proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pid: int | None) -> float | None:
    """CPU-seconds of a process and its children (PostgreSQL's server and its backends)."""
    if pid is None:
        return None
    total = _proc_cpu_s(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:  # its parent
                total += _proc_cpu_s(int(stat.parent.name))
    return total


def _proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _proc_pss_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return None


def _help_start_times(n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.monotonic()
        # (not checked: `tickle agent --help` exits 2 after printing its help)
        subprocess.run([sys.executable, "-m", "tickle", "agent", "--help"], check=False,
                       capture_output=True)  # fmt: skip
        times.append(time.monotonic() - t)
    return times


async def agent(root: Path, r: Results, idle_s: float) -> None:
    fleet = LocalFleet(root, ["ts1"], [AgentSpec("idle-agent", ["ts1"])], net=net(17))
    await start_fleet(fleet)
    try:
        popen = fleet.procs["idle-agent"].popen
        assert popen is not None
        pid = popen.pid
        cpu0, t0 = _proc_cpu_s(pid), time.monotonic()
        await asyncio.sleep(idle_s)
        cpu = (_proc_cpu_s(pid) - cpu0) / (time.monotonic() - t0) * 100
        rss, pss = _proc_rss_mb(pid), _proc_pss_mb(pid)
    finally:
        await fleet.stop()
    starts = await asyncio.to_thread(_help_start_times, 5)
    r.put("s7_rss_mb", rss, "MB", "S7 agent RSS after start, registration and idling")
    r.put("s7_pss_mb", pss, "MB", "S7 agent PSS (shared pages split)")
    r.put("s7_cpu_percent", cpu, "% of a core", f"S7 agent CPU over {idle_s:.0f} s idle")
    r.put(
        "s7_help_s",
        statistics.median(starts),
        "s",
        "S7 `tickle agent --help` start-up, median of 5",
    )
    r.md += [
        f"## S7: agent at rest ({idle_s:.0f} s idle)",
        "",
        f"RSS {rss:.1f} MB, PSS {pss or 0:.1f} MB, CPU {cpu:.3f} % of a core; "
        f"`tickle agent --help` {statistics.median(starts):.2f} s",
        "",
    ]


def speed_probe_ms() -> float:
    """A fixed piece of pure-Python work (JSON and arithmetic), the quickest of 5 tries, in ms.

    The same commit measured on the same 2-core machine has given twice the figures on one day
    than another (a host busier under the machine, not the load it shows): the probe, taken at
    the start and the end of a run, tells results from such days apart."""
    item = {"execution_id": 123456, "kind": "finished", "exit_code": 0, "output": "x" * 64}
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        total = 0
        for i in range(20_000):
            total += len(json.dumps(item)) + i * i % 7
            json.loads('{"a": [1, 2, 3], "b": "text"}')
        best = min(best, time.perf_counter() - t)
    return best * 1000


def fsync_probe_ms(directory: Path | None = None, tries: int = 50) -> float:
    """The median ms of writing 4 KiB to a file and fsyncing it, in `directory` (the system's
    temporary directory by default, where the bench's components keep their state): what every
    durable commit of the NS, the task servers and the agents waits for. The pure-Python probe
    missed a day whose S4 halved at the same probe."""
    block = b"x" * 4096
    times = []
    with tempfile.TemporaryDirectory(prefix="tickle-probe-", dir=directory) as tmp:
        fd = os.open(Path(tmp) / "probe", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for _ in range(tries):
                t = time.perf_counter()
                os.write(fd, block)
                os.fsync(fd)
                times.append(time.perf_counter() - t)
        finally:
            os.close(fd)
    return statistics.median(times) * 1000


def udp_probe_us(round_trips: int = 2000) -> float:
    """The median µs of a UDP datagram's round trip between two sockets on 127.0.0.1 (four system
    calls and the loopback twice, as a tickle and its answer's first bytes): the machine's
    system-call and network-stack speed. Bounded: `round_trips` datagrams each way, then stops."""
    times = []
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
    ):
        for sock in (a, b):
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(5)
        a_addr, b_addr = a.getsockname(), b.getsockname()
        for _ in range(round_trips):
            t = time.perf_counter()
            a.sendto(b"tickle", b_addr)
            b.recvfrom(64)
            b.sendto(b"pull", a_addr)
            a.recvfrom(64)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


@dataclass(frozen=True)
class Probes:
    """The machine's speed when a run started or ended (see the `*_probe_*` functions)."""

    python_ms: float
    fsync_ms: float
    udp_us: float

    @classmethod
    def take(cls) -> Probes:
        return cls(speed_probe_ms(), fsync_probe_ms(), udp_probe_us())


def probes_line(start: Probes, end: Probes) -> str:
    """The head line's account of the probes at the start and the end of a run."""
    return (
        f"speed probes at start / end: Python {start.python_ms:.0f} / {end.python_ms:.0f} ms, "
        f"fsync {start.fsync_ms:.2f} / {end.fsync_ms:.2f} ms, "
        f"UDP round trip {start.udp_us:.0f} / {end.udp_us:.0f} µs"
    )


def put_probes(r: Results, start: Probes, end: Probes) -> None:
    """The quickest of the start and end probes, as figures of the run."""
    r.put("speed_probe_ms", min(start.python_ms, end.python_ms), "ms",
          "machine speed: a fixed pure-Python workload, quickest of the start and end probes")  # fmt: skip
    r.put("fsync_probe_ms", min(start.fsync_ms, end.fsync_ms), "ms",
          "disk speed: median 4 KiB write and fsync, quickest of the start and end probes")  # fmt: skip
    r.put("udp_probe_us", min(start.udp_us, end.udp_us), "µs",
          "system-call speed: median UDP round trip on 127.0.0.1, quickest of start and end")  # fmt: skip


# --- main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", default=",".join(PARTS), help="parts to run, comma-separated: " + "|".join(PARTS)
    )
    parser.add_argument(
        "--agents",
        type=int,
        default=10_000,
        help="simulated agents of the fleet, pulls (a quarter) and register runs",
    )
    parser.add_argument("--net", type=int, default=0,
                        help="loopback second octet of the servers (the agents take the next)")  # fmt: skip
    parser.add_argument("--runs", type=int, default=200, help="S1 sequential run-nows")
    parser.add_argument("--gap-ms", type=float, default=100.0, help="S1 time between run-nows")
    parser.add_argument("--idle-s", type=float, default=60.0, help="S7 idle time")
    parser.add_argument("--skip-postgres", action="store_true",
                        help="fleet: S2 only (no PostgreSQL run)")  # fmt: skip
    parser.add_argument("--skip-sqlite", action="store_true",
                        help="fleet: S3 only (no SQLite run)")  # fmt: skip
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="keep the processes' directories (logs) and PostgreSQL's log in "
                             "DIR (else a temporary directory, removed)")  # fmt: skip
    parser.add_argument("--spy", type=Path, default=None, metavar="DIR",
                        help="fleet, curve: py-spy profiles of every server and the first "
                             "simulator from the run-now until all recorded, in DIR (raw "
                             "collapsed stacks; their timings are then not figures of record)")  # fmt: skip
    parser.add_argument("--ts-option", action="append", default=[], metavar="OPTION",
                        help="fleet, pulls, register: one more task-server command-line word, "
                             "e.g. "
                             "--ts-option=--agent-tickle-rate --ts-option=10000 (an A/B of a "
                             "setting; the figures of record use the defaults)")  # fmt: skip
    parser.add_argument("--cores", action="store_true",
                        help="fleet, curve: the cores each group of processes (NS, task servers, "
                             "simulators) keeps busy in each tenth of a run, sampled every 25 ms "
                             "(the bench's own sampling costs a little CPU)")  # fmt: skip
    parser.add_argument("--curve", default="1000,2500,5000,10000", help="S8 agent counts")
    parser.add_argument("--curve-rounds", type=int, default=CURVE_ROUNDS,
                        help="S8 runs of every size (in rounds; each size's median counts)")  # fmt: skip
    parser.add_argument("--long-polls", type=int, default=10_000,
                        help="longpoll: waiting long-polls one task server holds")  # fmt: skip
    parser.add_argument("--ingest-executions", type=int, default=10_000,
                        help="S4 executions (4 events each)")  # fmt: skip
    args = parser.parse_args()
    if not 0 <= args.net <= 253 or 60 <= args.net <= 184:
        parser.error("--net must be 0-253 and outside 60-184 (the tests' ranges)")
    args.parts = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in args.parts if p not in PARTS]
    if bad:
        parser.error(f"--only: unknown part {bad[0]!r}; choose from {', '.join(PARTS)}")
    for name in ("agents", "runs", "ingest_executions", "curve_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        args.sizes = [int(n) for n in args.curve.split(",")]
    except ValueError:
        parser.error(f"--curve: not a comma-separated list of agent counts: {args.curve!r}")
    # the fleet gives its processes their settings on their command lines only (LocalFleet._env
    # drops these): an A/B set this way would measure the defaults on both sides
    ignored = sorted(k for k in os.environ if k.startswith(("TICKLE_NS_", "TICKLE_TS_")))
    if ignored:
        parser.error(f"{ignored[0]} is not passed to the bench's servers: use --ts-option")
    return args


async def main() -> int:
    args = parse_args()
    global NET, KEEP, SPY, CORES
    NET = args.net
    CORES = args.cores
    if args.spy is not None:
        args.spy.mkdir(parents=True, exist_ok=True)
        SPY = args.spy.resolve()
    r = Results()
    started = time.time()
    probe_start = Probes.take()
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            root = KEEP = args.keep.resolve()
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="tickle-bench-")))
        steps = {
            "latency": lambda: latency(root / "latency", r, args.runs, args.gap_ms / 1000),
            "fleet": lambda: fleet(
                root / "fleet",
                r,
                args.agents,
                not args.skip_postgres,
                not args.skip_sqlite,
                args.ts_option,
            ),
            "ingest": lambda: ingest(root / "ingest", r, args.ingest_executions),
            "pulls": lambda: pulls(root / "pulls", r, max(1, args.agents // 4), args.ts_option),
            "register": lambda: register(root / "register", r, args.agents, args.ts_option),
            "agent": lambda: agent(root / "agent", r, args.idle_s),
            "curve": lambda: curve(root / "curve", r, args.sizes, args.curve_rounds),
            "longpoll": lambda: long_polls(root / "longpoll", r, args.long_polls),
        }
        for part in PARTS:
            if part in args.parts:
                print(f"bench: {part} ...", file=sys.stderr, flush=True)
                t = time.monotonic()
                try:
                    await steps[part]()
                except Exception as exc:  # the other parts still run, and the results are written
                    r.notes.append(f"{part}: failed: {type(exc).__name__}: {exc}")
                print(
                    f"bench: {part} done in {time.monotonic() - t:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    probe_end = Probes.take()
    put_probes(r, probe_start, probe_end)
    table = targets_table(r)
    head = (f"# Tickle benchmarks ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
            f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, "
            f"{probes_line(probe_start, probe_end)}, "
            f"parts: {','.join(args.parts)})")  # fmt: skip
    text = "\n".join([head, "", *table, "", *[f"- {n}" for n in r.notes], "", *r.md])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.md").write_text(text + "\n")
    doc = {
        "started": started,
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "load_1m_at_end": os.getloadavg()[0],
                    "speed_probe_ms": [probe_start.python_ms, probe_end.python_ms],
                    "fsync_probe_ms": [probe_start.fsync_ms, probe_end.fsync_ms],
                    "udp_probe_us": [probe_start.udp_us, probe_end.udp_us]},
        "parts": args.parts,
        "figures": r.figures,
        "targets": [{"id": t.id, "what": t.what, "now": t.now(r), "target": t.target,
                     "met": t.met(r)} for t in TARGETS],
        "notes": r.notes,
    }  # fmt: skip
    (RESULTS / "latest.json").write_text(json.dumps(doc, indent=2) + "\n")
    print("\n".join([head, "", *table, "", *[f"- {n}" for n in r.notes]]))
    print(f"(details in {RESULTS / 'latest.md'}, figures in {RESULTS / 'latest.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
