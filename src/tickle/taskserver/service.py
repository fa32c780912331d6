"""Run the task server: `tickle task-server [flags]`.

Start order: bind the tickle socket and the API socket, obtain credentials from the NS (stored
ones first; a new task server waits while the NS does not admit it: approval, identity), take
the client list and the settings, then start the agent tickler, the event forwarder, the API and
the periodic NS check; tickle agents for work cached before a restart and pull work once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import functools
import logging
import signal
import socket
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import aiohttp
import uvicorn
from fastapi import FastAPI

from tickle import localdb, wire
from tickle.backoff import Backoff
from tickle.clock import ClockWarning
from tickle.config import ConfigError, check_config, load_settings
from tickle.front import AtOnceFront
from tickle.http import ApiError, retry_after_s
from tickle.listening import TickleListener
from tickle.logs import setup_logging
from tickle.messages import TaskServerCredentials, TaskServerRegister
from tickle.metrics import ComponentMetrics
from tickle.outbox import Outbox, OutboxForwarder
from tickle.serving import CollectorPause, RequestHold, ServingConfig, run_server, settle_gc
from tickle.statedir import make_private
from tickle.taskserver.agent_clocks import AgentClocks
from tickle.taskserver.agent_pulls import AgentPulls
from tickle.taskserver.agent_tickler import AgentTickler
from tickle.taskserver.api import LONG_POLL, create_app
from tickle.taskserver.enrollment import Enrollment
from tickle.taskserver.fast_path import EVENTS, TASKS
from tickle.taskserver.long_polls import LongPolls
from tickle.taskserver.ns_client import NsClient, ns_away
from tickle.taskserver.ns_sync import NsSync
from tickle.taskserver.settings import TaskServerSettings
from tickle.taskserver.state_reporter import StateReporter
from tickle.taskserver.store import OUTBOX_FILE, Store
from tickle.taskserver.work_cache import WorkCache
from tickle.tickling import PullsDue

log = logging.getLogger(__name__)

T = TypeVar("T")
# status events per post to the NS: the NS records a post in one transaction, so fewer, larger
# posts cost it less per event (the NS splits nothing: a batch over its body limit is split here)
FORWARD_BATCH = 500
# while agents' events arrive in a burst (over 200 a second), a post to the NS waits until this
# long after the previous one: 1,500 agents pulling at once made ~470 posts of ~10 events each.
# At 0.02 s, 10,000 agents over 4 task servers still made ~1,040 posts of ~38 events, each a
# transaction of three statements on PostgreSQL (S3, alternated, 0.02 against 0.1: NS processes
# 0.34 / 0.36 against 0.24 / 0.26 CPU-s per 1,000 agents, all recorded after 10.8 / 10.4 against
# 9.1 / 9.3 s; SQLite's S2 the same either way). A burst's events wait this much more at most.
# One agent's run (S1) brings 4 events in ~10 ms: never lingers
FORWARD_LINGER_S = 0.1
FORWARD_BUSY_EVENTS = 20
# posts to the NS at once: an agent's `finished` goes while its `started` is being recorded
FORWARD_IN_FLIGHT = 2


class StartupError(Exception):
    """The task server cannot start (the NS stayed unreachable, or refused to register it)."""


class NotAdmitted(Exception):
    """The NS does not admit this task server now (403: awaiting approval or rejected; 409: its
    name is held by another identity); asking again later may succeed."""


def main(args: list[str]) -> int:
    """Entry point of `tickle task-server`; returns the process exit code."""
    checked = check_config("task-server", TaskServerSettings, args)
    if checked is not None:
        return checked
    try:
        settings = load_settings(TaskServerSettings, args)
    except ConfigError as exc:
        print(f"tickle task-server: {exc}", file=sys.stderr)
        return 2
    setup_logging("task-server", settings.log_level, settings.log_format)
    try:
        make_private(settings.state_dir)
    except ConfigError as exc:
        print(f"tickle task-server: {exc}", file=sys.stderr)
        return 2
    try:
        return run_server(run(settings))
    except KeyboardInterrupt:
        return 0


async def run(settings: TaskServerSettings) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean stop, 1 when the task server cannot start."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        server = TaskServer(settings)
    except (OSError, sqlite3.Error) as exc:
        log.error("cannot open the state in %s: %s", settings.state_dir, exc)
        return 1
    try:
        starting = asyncio.create_task(server.start())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            log.info("stop requested while starting")
            starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting  # re-raises a startup failure
        if not starting.cancelled():
            settle_gc()
        await stopping
        return 0
    except (StartupError, OSError) as exc:  # OSError: a port already in use
        log.error("cannot start: %s", exc)
        return 1
    finally:
        await server.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


class TaskServer:
    """One task server: its sockets, state, NS link and background tasks."""

    def __init__(self, settings: TaskServerSettings) -> None:
        self.settings = settings
        self.metrics = ComponentMetrics("task-server")
        self.store = Store(settings.state_dir)
        self.outbox = Outbox(settings.state_dir / OUTBOX_FILE)
        self.ns = NsClient(settings.ns_url, settings.ns_timeout_s, settings.ns_ca_file)
        # a fan-out's pulls first: the agents' events, the task server's hop reports and its
        # state reports wait while tickled agents' pulls are due (`pulls_first_s` at most), the
        # state reports then while the events go to the NS (as long again at most)
        self.pulls_due = PullsDue()
        # nor does the garbage collector pass over the fan-out's connections meanwhile
        self.pulls_due.on_busy.append(CollectorPause().busy)
        self.reporter = StateReporter(
            self.ns,
            contact_interval_s=settings.contact_report_interval_s,
            on_forgotten=self.store.remove_clients,
            quiet=self._events_first if settings.pulls_first_s else None,
        )
        self.forwarder = OutboxForwarder(
            self.outbox,
            self.ns.send_events,
            self.metrics,
            batch_size=FORWARD_BATCH,
            linger_s=FORWARD_LINGER_S,
            busy_events=FORWARD_BUSY_EVENTS,
            in_flight=FORWARD_IN_FLIGHT,
        )
        self.ns.on_back(self.forwarder.reopen)  # events waiting out a retry go once the NS is back
        # the agents' pulls and events commit in groups, synced off the event loop
        self.wal_sync = localdb.WalSync([self.store.path, settings.state_dir / OUTBOX_FILE])
        self.work_cache = WorkCache(
            self.store, self.forwarder, self.metrics, self.wal_sync,
            pulls_due=self.pulls_due, pulls_first_s=settings.pulls_first_s,
        )  # fmt: skip
        self.agent_clocks = AgentClocks(self.reporter, self.metrics, settings.freshness_window_s)
        self.long_polls = LongPolls(self.metrics, settings.max_long_polls)
        self.agents = AgentTickler(
            settings.name,
            self.store,
            self.work_cache,
            self.reporter,
            self.metrics,
            settings.tickle_backoff(),
            self.agent_clocks,
            long_polls=self.long_polls,
            rate=settings.agent_tickle_rate,
            window=settings.agent_tickle_window,
            window_initial=settings.agent_tickle_window_initial,
            window_target_s=settings.agent_tickle_window_target_s,
            pulls_due=self.pulls_due,
        )
        self.sync = NsSync(
            self.ns, self.store, self.work_cache, self.agents, settings.ns_check_interval_s
        )
        self.enrollment = Enrollment(settings, self.ns, self.store, self.sync)
        self.agent_pulls = AgentPulls(
            self.store, self.work_cache, self.agents, self.reporter, self.metrics, self.long_polls
        )
        self.credentials: TaskServerCredentials | None = None
        self._ns_key: bytes | None = None
        self.listener = TickleListener(
            wire.TickleGuard(
                keys=self._key_of_sender,
                freshness_s=settings.freshness_window_s,
                marks=self.store.tickle_marks,
            ),
            self.metrics,
            on_tasks=functools.partial(self.sync.work.trigger, "tickle"),
            on_settings=functools.partial(self.sync.settings.trigger, "tickle"),
            on_rejected=ClockWarning(
                lambda: self.ns.clock_offset_s, lambda: "the notification server",
                settings.freshness_window_s, log,
            ).rejected,
        )  # fmt: skip
        self.tickle_port = 0
        self.api_port = 0
        self._api_socket: socket.socket | None = None
        self._api: _Server | None = None
        self.api: FastAPI | None = None  # the agent API app being served
        # the agent API's pulls first (`_request_hold`)
        self.api_request_hold: RequestHold | None = None
        self._api_task: asyncio.Task[None] | None = None
        self._started = False

    @property
    def _advertised_port(self) -> int:
        return self.settings.advertise_port or self.tickle_port

    @property
    def api_url(self) -> str:
        return self.settings.agent_api_url(self.api_port)

    async def start(self) -> None:
        """Bind, obtain credentials and state from the NS, start every loop."""
        s = self.settings
        # the agents' tickles can go from the moment the NS's can come: an NS tickle taken
        # while the start still waits on the NS pulls work and tickles its agents (S6: before,
        # every first send of a restarted task server's first burst found no socket)
        await self.agents.start()
        _, self.tickle_port = await self.listener.start(s.tickle_host, s.tickle_port)
        self._api_socket = _bind_tcp(s.api_host, s.api_port)
        self.api_port = int(self._api_socket.getsockname()[1])
        log.info(
            "task server %s: tickles on %s:%d/udp, agent API on %s:%d",
            s.name, s.tickle_host, self.tickle_port, s.api_host, self.api_port,
        )  # fmt: skip

        await self._obtain_credentials()
        await self._until_ns_answers("client list", self.sync.refresh_clients)
        await self._until_ns_answers("settings", functools.partial(self.sync.settings.run, "start"))

        self.reporter.start()
        self.forwarder.start()
        await self._start_api()
        self._started = True
        # the native tickle: work cached before a restart goes out without an NS tickle
        self.agents.tickle_pending()
        self.sync.work.trigger("start")
        self.sync.start_periodic()
        log.info("task server %s ready (NS %s)", s.name, s.ns_url)

    async def stop(self) -> None:
        """Stop every loop and close every socket and file (safe to call more than once)."""
        self.long_polls.close()  # the waiting long-polls return empty: their agents re-arm
        if self._api is not None:
            self._api.should_exit = True
        if self._api_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._api_task
            self._api_task = None
        if self._api_socket is not None:
            self._api_socket.close()
            self._api_socket = None
        self.listener.close()
        await self.sync.close()
        await self.agents.close()
        self.work_cache.flush()  # the hop reports waiting for a commit to ride
        await self.forwarder.stop()
        await self.reporter.close()
        await self.ns.close()
        self.outbox.close()
        self.store.close()

    # --- credentials --------------------------------------------------------------------------

    def _registration_key(self) -> str:
        # registering again when where the NS must reach us changed (new port, new URL)
        s = self.settings
        return f"{s.ns_url}|{s.name}|{s.advertised_host}|{self._advertised_port}|{self.api_url}"

    def _key_of_sender(self, sender: str) -> bytes | None:
        creds = self.credentials
        if creds is None or sender != creds.ns_id:
            return None
        return self._ns_key

    async def _obtain_credentials(self) -> None:
        stored = self.store.credentials(self._registration_key())
        if stored is not None:
            log.info("using stored credentials from the NS (ns_id %s)", stored.ns_id)
            self._use(stored)
            return
        await self._until_ns_answers("registration", self._register_when_admitted)

    async def _register_when_admitted(self) -> TaskServerCredentials:
        """Register, asking again with capped backoff while the NS does not admit us: awaiting an
        operator's approval, rejected, or our name held by another identity (until re-keyed)."""
        # full jitter: task servers an NS refused together do not come back together
        backoff = Backoff(base_s=1.0, max_s=60.0, tries=None, full_jitter=True)
        attempt = 0
        while True:
            try:
                return await self._register()
            except NotAdmitted as exc:
                delay = backoff.delay(attempt)
                attempt += 1
                log.warning("the NS does not admit task server %s: %s; asking again in %.0fs",
                            self.settings.name, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)

    async def _register(self) -> TaskServerCredentials:
        s = self.settings
        body = TaskServerRegister(
            enrollment_secret=s.enrollment_secret.get_secret_value(),
            name=s.name,
            tickle_host=s.advertised_host,
            tickle_port=self._advertised_port,
            api_url=self.api_url,
            identity=self.store.identity(),
        )
        try:
            creds = await self.ns.register(body)
        except ApiError as exc:
            if exc.status in (403, 409):
                raise NotAdmitted(exc.detail) from None
            if exc.status in (401, 422):
                raise StartupError(f"the NS refused to register {s.name}: {exc.detail}") from None
            raise
        self.store.save_credentials(self._registration_key(), creds)
        log.info("registered with the NS at %s (ns_id %s)", s.ns_url, creds.ns_id)
        self._use(creds)
        return creds

    def _use(self, creds: TaskServerCredentials) -> None:
        try:
            key = base64.b64decode(creds.tickle_key, validate=True)
        except (binascii.Error, ValueError):
            raise StartupError("the NS handed out a tickle key that is not base64") from None
        self.credentials = creds
        self._ns_key = key
        self.ns.use_credentials(creds, self._register)

    async def _until_ns_answers(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """Retry `call` with capped backoff while the NS is unreachable, for `ns_wait_s`: after
        the NS's Retry-After when it said one, spread by full jitter (every task server of a site
        restarted with its NS would otherwise come back in step)."""
        backoff = Backoff(base_s=0.5, max_s=10.0, tries=None, full_jitter=True)
        limit = self.settings.ns_wait_s
        deadline = time.monotonic() + limit if limit else None
        attempt = 0
        while True:
            try:
                return await call()
            except aiohttp.ClientSSLError as exc:
                # an NS whose certificate does not verify is not "unreachable": stop and say so
                raise StartupError(
                    f"{what}: TLS with the NS at {self.settings.ns_url} failed (its certificate"
                    f" must verify against ns_ca_file={self.settings.ns_ca_file or 'system'}):"
                    f" {exc}"
                ) from None
            except (aiohttp.ClientError, TimeoutError, ApiError) as exc:
                if not ns_away(exc):
                    raise StartupError(f"{what}: the NS answered {exc}") from None
                delay = backoff.wait(attempt, retry_after_s(exc))
                attempt += 1
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise StartupError(
                        f"{what}: the NS at {self.settings.ns_url} stayed unreachable for"
                        f" {limit:.0f}s ({exc})"
                    ) from None
                log.warning(
                    "%s: the NS at %s is unreachable (%s); retry %d in %.1fs",
                    what, self.settings.ns_url, exc, attempt, delay,
                )  # fmt: skip
                await asyncio.sleep(delay)

    # --- the API --------------------------------------------------------------------------------

    def api_app(self) -> FastAPI:
        """The agent-facing API over this task server's services (what `start` serves)."""
        return create_app(
            limits=self.settings,
            store=self.store,
            metrics=self.metrics,
            enrollment=self.enrollment,
            agent_pulls=self.agent_pulls,
            work_cache=self.work_cache,
            agent_clocks=self.agent_clocks,
        )

    async def _start_api(self) -> None:
        app = self.api = self.api_app()
        self.api_request_hold = self._request_hold()
        config = ServingConfig(
            app, self.settings, self.metrics, long_poll_paths=[LONG_POLL],
            max_long_polls=self.settings.max_long_polls,
            request_hold=self.api_request_hold,
            log_config=None, access_log=False, lifespan="off",
            ssl_certfile=self.settings.tls_cert_file, ssl_keyfile=self.settings.tls_key_file,
            http=AtOnceFront,  # an agent's pull answered without uvicorn's machinery
        )  # fmt: skip
        # crowded, nothing waits for a fan-out's pulls (its requests held keep their
        # connections), and the fan-out tickles no more agents than there is room for
        table = config.connections
        table.on_crowded.append(self.work_cache.release_now)
        self.work_cache.crowded = table.crowded
        if self.agents.tickler.windowed:
            self.agents.tickler.gate_window(table.room)
        self._api = _Server(config)
        assert self._api_socket is not None
        self._api_task = asyncio.create_task(self._api.serve(sockets=[self._api_socket]))
        deadline = time.monotonic() + 10.0
        while not self._api.started:
            if self._api_task.done() or time.monotonic() > deadline:
                raise StartupError(f"the agent API did not start on port {self.api_port}")
            await asyncio.sleep(0.01)

    async def _events_first(self) -> None:
        """Before a state report: once no tickled agent's pull is due (`pulls_first_s` at most),
        then once the status events held meanwhile are committed and gone to the NS (as long
        again at most). After a fan-out's pulls the NS has its agents' events, the hop reports,
        and as many reachability and clock reports to take in on one core: the events, which
        the operator waits for, go first."""
        await self.pulls_due.none_within(self.settings.pulls_first_s)
        until = time.monotonic() + self.settings.pulls_first_s
        await self.work_cache.settled(self.settings.pulls_first_s)  # in the outbox
        await self.forwarder.drained(max(0.0, until - time.monotonic()))  # gone to the NS

    def _request_hold(self) -> RequestHold | None:
        """A fan-out's pulls first, at the connections: while tickled agents' pulls are due, the
        status events an agent posts next after its pull are not served, `pulls_first_s` at
        most (the work cache holds the events that come otherwise)."""
        if not self.settings.pulls_first_s:
            return None
        due = self.pulls_due
        return RequestHold(
            [TASKS], [EVENTS], lambda: due.count > 0, due.none_within, self.settings.pulls_first_s
        )


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP;
    # without it a response's body waits ~40 ms for the delayed ACK of its headers (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
