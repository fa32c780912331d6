"""The settings service: the central settings, their changes (a settings tickle to every task
server) and the task servers' pulls of them."""

from __future__ import annotations

import logging
import time

from fastapi.concurrency import run_in_threadpool

from tickle import messages as m
from tickle import wire
from tickle.ns.credentials import Caller
from tickle.ns.stores.settings import SettingsStore
from tickle.ns.tickle_server import TickleServer

log = logging.getLogger(__name__)


class SettingsService:
    """The central settings, over the settings store and the tickle server."""

    def __init__(self, store: SettingsStore, tickle_server: TickleServer) -> None:
        self._store = store
        self._tickle_server = tickle_server

    async def update(self, body: m.SettingsUpdate) -> m.SettingsOut:
        """Change the settings, bump their version and tickle every task server; an update
        that changes nothing does neither."""
        out, changed = await run_in_threadpool(self._store.update_settings, body)
        if changed:
            self._tickle_server.notify()  # its pass sees the new version, sends settings tickles
            log.info("settings version %d", out.version)
        return out

    async def pull(self, ts: Caller, via: m.TsPullVia) -> m.SettingsOut:
        """The task server's settings pull; one the settings tickle caused acknowledges it."""
        now = time.time()
        # only a pull the settings tickle caused proves it arrived
        with self._tickle_server.pulling(ts.name, wire.Kind.SETTINGS, via == "tickle"):
            return await run_in_threadpool(self._store.pull_settings, ts, now, via)

    def settings(self) -> m.SettingsOut:
        return self._store.settings()
