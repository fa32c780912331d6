"""The inventory service: registering task servers and agents, what operators and task servers see
of them, and what this notification server is."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence

from fastapi.concurrency import run_in_threadpool

from tickle import messages as m
from tickle.ns.about import about
from tickle.ns.credentials import Caller
from tickle.ns.database import Database
from tickle.ns.errors import Unauthorized
from tickle.ns.group_commit import GroupCommit
from tickle.ns.liveness import OfflineBound
from tickle.ns.stores.inventory import Enrolled, Enrollment, InventoryStore
from tickle.ns.tickle_server import TickleServer

log = logging.getLogger(__name__)


class InventoryService:
    """Task servers and computers, over the inventory store and the tickle server."""

    def __init__(
        self,
        store: InventoryStore,
        database: Database,
        tickle_server: TickleServer,
        enrollment_secret: str,
        ns_id: str,
        offline_bound: OfflineBound,
        manual_approval: bool = False,
    ) -> None:
        self._store = store
        self._manual = manual_approval  # new names wait for an operator (registration_approval)
        self._database = database
        self._tickle_server = tickle_server
        self._enrollment_secret = enrollment_secret
        self._ns_id = ns_id
        self.offline_bound = offline_bound
        self._enrollments: GroupCommit[Enrollment, Enrolled] = GroupCommit(
            "agent registrations", store.enroll_agents
        )

    async def register_task_server(self, body: m.TaskServerRegister) -> m.TaskServerCredentials:
        """Register (or re-register, rotating its credentials) a task server that knows the
        enrollment secret."""
        if not hmac.compare_digest(
            body.enrollment_secret.encode(), self._enrollment_secret.encode()
        ):
            raise Unauthorized("wrong enrollment_secret")
        creds = await run_in_threadpool(
            self._store.register_task_server, body, self._ns_id, self._manual
        )
        self._tickle_server.notify()  # refresh its key and address in the tickle server
        log.info("task server %s registered (tickles to %s:%d)", body.name, body.tickle_host,
                 body.tickle_port)  # fmt: skip
        return creds

    async def register_agent(self, ts: Caller, body: m.AgentRegistration) -> m.AgentCredentials:
        """Register an agent with the calling task server (moving its computer there).

        Registrations that arrive together are written in one transaction (a fleet registering
        at once queued for SQLite's write lock one by one), each answered as if alone."""
        enrolled = await self._enrollments.submit(Enrollment(ts, body, self._manual))
        if enrolled.moved:  # work pending for a computer that moved goes to its new TS
            # (not for every registration: a fleet registering ran a dispatch pass, five
            # queries, for each of its agents)
            self._tickle_server.notify()
        return enrolled.credentials

    async def about(self, started_at: float) -> m.About:
        """What this notification server is, and whether it is the tickle dispatcher now."""
        # the dispatcher role lives on the event loop; the schema revision is a database read
        active = self._tickle_server.dispatcher_active
        return await run_in_threadpool(about, self._database, active, started_at)

    def caller_for(self, sha: str) -> Caller | None:
        """The task server (or agent) whose token hashes to `sha`."""
        return self._store.caller_for(sha)

    def cached_caller(self, sha: str) -> Caller | None:
        """The task server whose token hashes to `sha`, if this process looked it up lately
        (never a database query: safe on the event loop)."""
        return self._store.callers.get(sha)

    def clients(self, ts: Caller) -> list[m.ClientInfo]:
        return self._store.clients(ts)

    def task_servers(self) -> list[m.TaskServerOut]:
        return self._store.task_servers()

    def computers(self, liveness: m.Liveness | None = None) -> list[m.ComputerOut]:
        """The computers, online or offline; `liveness`: only those in that state."""
        return self._store.computers(self.offline_bound, liveness)

    def liveness_counts(self) -> dict[m.Liveness, int]:
        return self._store.liveness_counts(self.offline_bound)

    def update_computer_states(self, ts: Caller, states: Sequence[m.ComputerState]) -> list[str]:
        """Apply what a task server saw of its clients; the names the NS does not know."""
        return self._store.update_computer_states(ts, states)
