"""Runs the Client Task Agent: `tickle agent` calls `main(args)`.

Start order: settings (a bad one stops the agent before it binds anything), how tasks are
contained (`containment.detect`: a cgroup per step, else the agent is their subreaper), state,
registration with the first reachable task server, report executions a previous run left
unfinished, then the tickle listener (not in CEM mode), the outbox forwarder, the control socket,
the poll timer, and one pull at once; then the failover watch (with several task servers).
SIGTERM/SIGINT stop it cleanly: running tasks are killed with all their processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from typing import Any

import msgspec

from tickle import __version__, clock, localdb, wire
from tickle.agent import retries
from tickle.agent.containment import Containment, detect
from tickle.agent.control import ControlServer
from tickle.agent.executor import Executor
from tickle.agent.failover import Failover
from tickle.agent.poller import Poller
from tickle.agent.settings import AgentSettings
from tickle.agent.start import read_settings
from tickle.agent.state import AgentState
from tickle.agent.ts_client import NotRegistered, TaskServerClient
from tickle.agentapi import AgentPolicy
from tickle.listening import TickleListener
from tickle.logs import setup_logging
from tickle.metrics import AgentMetrics
from tickle.outbox import Outbox, OutboxForwarder
from tickle.settingsbase import ConfigError
from tickle.statedir import make_private

log = logging.getLogger(__name__)


def main(args: list[str]) -> int:
    """Run the agent until SIGTERM/SIGINT; 2 on a configuration error (nothing bound)."""
    settings = read_settings(args)
    return settings if isinstance(settings, int) else run(settings)


def run(settings: AgentSettings) -> int:
    """Run the agent with its settings read (`tickle.agent.start`) until SIGTERM/SIGINT."""
    try:
        wall_clock = clock.from_environment(os.environ)  # shifted in tests only
    except clock.ClockConfigError as exc:
        print(f"tickle agent: {exc}", file=sys.stderr)
        return 2
    setup_logging("agent", settings.log_level, settings.log_format)
    try:
        make_private(settings.state_dir)
    except ConfigError as exc:
        print(f"tickle agent: {exc}", file=sys.stderr)
        return 2
    containment = detect()  # before anything runs: it may move this process to a cgroup
    try:
        asyncio.run(_serve_until_signal(settings, containment, wall_clock))
    except OSError as exc:  # e.g. the tickle port is taken
        log.error("agent stopped: %s", exc)
        return 1
    return 0


async def _serve_until_signal(
    settings: AgentSettings, containment: Containment, wall_clock: clock.Clock
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await serve(settings, stop, containment, wall_clock)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def serve(
    settings: AgentSettings,
    stop: asyncio.Event,
    containment: Containment | None = None,
    wall_clock: clock.Clock = time.time,
) -> None:
    """Run an agent until `stop` is set (in-process entry, used by tests too)."""
    agent = Agent(settings, containment, wall_clock)
    try:
        await agent.start(stop)
        if not stop.is_set():
            await stop.wait()
    finally:
        await agent.stop()


class Agent:
    """One running agent: its state, client, listener, poller, executor and control socket."""

    def __init__(
        self,
        settings: AgentSettings,
        containment: Containment | None = None,
        wall_clock: clock.Clock = time.time,
    ) -> None:
        """`containment`: `detect()`'s, in `tickle agent`; in-process (tests) orphans of tasks
        are not adopted (see subreaper.py). `wall_clock`: the time the agent reads (its tickles'
        freshness, its events' times, what its requests say), shifted in tests only."""
        self.settings = settings
        self.clock = wall_clock
        self.metrics = AgentMetrics()
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state = AgentState(settings.state_dir / "agent.db")
        self.outbox = Outbox(settings.state_dir / "outbox.db")
        self.client = TaskServerClient(settings, self.state, clock=wall_clock)
        # a run's `finished` goes while its `started` awaits the task server's answer (given
        # once that event is on the task server's disk), not after it
        self.forwarder = OutboxForwarder(
            self.outbox, self.client.events, self.metrics, backoff=retries.EVENTS, in_flight=2
        )
        self.executor = Executor(
            settings.name, self.state, self.forwarder, self.metrics,
            output_tail_bytes=settings.output_tail_bytes,
            output_max_bytes=settings.output_max_bytes, containment=containment,
            kill_grace_s=settings.task_kill_grace_s, task_umask=int(settings.task_umask, 8),
            clock=wall_clock, wal_sync=localdb.WalSync([settings.state_dir / "outbox.db"]),
        )  # fmt: skip
        default_policy = AgentPolicy(
            settings_version=0,
            task_request_interval_s=settings.default_task_request_interval_s,
            poll_jitter_fraction=0.1,
            cem=settings.cem,
        )
        self.poller = Poller(self.client, self.state, self.executor, self.metrics, default_policy)
        self.failover = Failover(
            self.client, settings.failover_after_s, settings.failover_check_interval_s,
            self._after_failover,
        )  # fmt: skip
        self.listener: TickleListener | None = None
        self.tickle_addr: tuple[str, int] | None = None
        self.control = ControlServer(self, settings.socket_path)
        self.started_at = time.time()
        self._forwarder_started = False
        self._background: set[asyncio.Task[None]] = set()

    async def start(self, stop: asyncio.Event | None = None) -> None:
        """Bring every part up; returns once the first pull was made (or stop was set)."""
        s = self.settings
        await self.client.start()
        for execution_id in self.state.unfinished():
            log.warning("execution %d was running when the agent stopped", execution_id)
            self.executor.report_interrupted(execution_id)
        await self.control.start(s.metrics_host, s.metrics_port)
        if not s.cem:  # a CEM agent opens no tickle port at all: it polls
            self.listener = TickleListener(
                wire.TickleGuard(keys=self._tickle_key, freshness_s=s.freshness_window_s,
                                 clock=self.clock, marks=self.state.tickle_marks),
                self.metrics, on_tasks=self._on_tasks_tickle, on_settings=self._on_settings_tickle,
                on_rejected=clock.ClockWarning(
                    lambda: self.client.clock_offset_s, self._ts_name, s.freshness_window_s, log
                ).rejected,
            )  # fmt: skip
            self.tickle_addr = await self.listener.start(s.tickle_host, s.tickle_port)
            log.info("tickle listener on %s:%d/udp", *self.tickle_addr)
        if not await self._register(stop):
            return
        self.forwarder.start()
        self._forwarder_started = True
        await self.poller.pull_quietly("poll")
        self.poller.start()  # after the first pull: a failed one makes the first poll sooner
        self.failover.start()

    async def stop(self) -> None:
        """Stop timers and sockets; executions that cannot finish in the grace are killed, with
        every process they started, and reported interrupted."""
        if self.listener is not None:
            self.listener.close()
        await self.failover.stop()
        for task in list(self._background):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.poller.stop(self.settings.stop_grace_s)
        # each stopped execution killed its processes; anything they left dies here
        await self.executor.containment.close(self.settings.task_kill_grace_s)
        if self._forwarder_started:
            # give the last events a moment to reach the task server; the outbox keeps the rest
            await self.forwarder.drained(1.0)
            await self.forwarder.stop()
        await self.control.close()
        await self.client.close()
        self.outbox.close()
        self.state.close()

    # --- what the control API calls ------------------------------------------------------------

    async def check_now(self) -> dict[str, Any]:
        result = await self.poller.pull("check_now")
        return {"via": result.via, "executions": result.executions, "started": result.started}

    async def policy_refresh(self) -> dict[str, Any]:
        policy = await self.poller.refresh_policy()
        return {"policy": msgspec.structs.asdict(policy)}

    def status(self) -> dict[str, Any]:
        creds = self.client.credentials
        return {
            "name": self.settings.name,
            "version": __version__,
            "task_server": creds.ts_name if creds else None,
            "task_server_url": creds.url if creds else None,
            "registered": creds is not None,
            "cem": self.settings.cem,
            "containment": self.executor.containment.kind,
            "reported_address": self.client.reported_address,
            "tickle_listener": (
                f"{self.tickle_addr[0]}:{self.tickle_addr[1]}" if self.tickle_addr else None
            ),
            "policy": msgspec.structs.asdict(self.poller.policy),
            "executions": self.state.counts(),
            "running": self.poller.running,
            "outbox_depth": self.outbox.depth(),
            "last_pull_at": self.poller.last_pull_at,
            "last_poll_at": self.poller.last_poll_at,
            "next_poll_at": self.poller.next_poll_at,
            "long_polling": self.poller.long_polling,
            "last_tickle_at": self.listener.last_tickle_at if self.listener else None,
            "clock_offset_s": self.client.clock_offset_s,
            "last_error": self.poller.last_error,
            "failovers": self.failover.failovers,
            "last_failover_at": self.failover.last_failover_at,
            "started_at": self.started_at,
        }

    # --- internals -----------------------------------------------------------------------------

    async def _register(self, stop: asyncio.Event | None) -> bool:
        """Register (unless already) retrying with backoff; False when stopped first."""
        attempt = 0
        while stop is None or not stop.is_set():
            try:
                await self.client.ensure_registered()
                return True
            except NotRegistered as exc:
                # no sooner than a busy task server asked (Retry-After), spread after that
                delay = retries.REGISTER.wait(attempt, exc.retry_after_s)
                attempt += 1
                # each task server's answer was logged as it came: this only says when again
                log.info("not registered (%s); asking again in %.1fs", exc, delay)
                if stop is None:
                    await asyncio.sleep(delay)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
        return False

    async def _after_failover(self) -> None:
        # a new task server: deliver queued events there and pull what it already holds for us
        self.forwarder.wake()
        await self.poller.pull_quietly("poll")

    def _tickle_key(self, sender: str) -> bytes | None:
        # looked up per datagram: a re-registration rotates the key without a restart
        return self.client.tickle_keys().get(sender)

    def _ts_name(self) -> str:
        creds = self.client.credentials
        return f"task server {creds.ts_name if creds else '?'}"

    def _on_tasks_tickle(self) -> None:
        self.poller.trigger("tickle")

    def _on_settings_tickle(self) -> None:
        task = asyncio.create_task(self._refresh_quietly())
        self._background.add(task)  # keep a reference until it is done
        task.add_done_callback(self._background.discard)

    async def _refresh_quietly(self) -> None:
        try:
            await self.poller.refresh_policy(via="tickle")
        except Exception as exc:
            log.warning("policy refresh after a settings tickle failed: %s", exc)
