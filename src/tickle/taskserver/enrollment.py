"""Agent enrollment: an agent with the agents' enrollment secret is registered with the NS
through us (the task servers' secret, which registers a task server, is another one).

The NS issues the agent's credentials; the task server keeps only the SHA-256 of its token, with
its tickle key and addresses. An agent that fails over to this task server brings its unfinished
work: that work is pulled from the NS before the agent is answered, so its first pull finds it.

Group commit: the credentials of every agent whose registration the NS answered in one turn of the
event loop are kept in one transaction (one fsync), each agent answered once its own are durable.
A fleet registering at once made one fsync per agent, each blocking the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging

import aiohttp

from tickle.http import ApiError
from tickle.messages import AgentEnrollment, AgentRegister, AgentRegistration
from tickle.taskserver.ns_client import NsClient
from tickle.taskserver.ns_sync import NsSync
from tickle.taskserver.policy import policy_for
from tickle.taskserver.refusal import Refused
from tickle.taskserver.settings import TaskServerSettings
from tickle.taskserver.store import Client, Store

log = logging.getLogger(__name__)

# NS answers passed on to the agent as they are; any other NS error is a bad gateway (502)
_NS_ANSWERS_PASSED_ON = frozenset({403, 404, 409, 422})


class Enrollment:
    """Enrolls agents with this task server and the NS."""

    def __init__(
        self, settings: TaskServerSettings, ns: NsClient, store: Store, sync: NsSync
    ) -> None:
        self._settings = settings
        self._ns = ns
        self._store = store
        self._sync = sync
        self._saving: list[tuple[Client, asyncio.Future[None]]] = []

    async def enroll(self, body: AgentRegister, observed: str | None) -> AgentEnrollment:
        """Check the secret, register the agent with the NS, keep its credentials.

        `observed`: the address the agent's request came from. Raises `Refused`.
        """
        expected = self._settings.agent_enrollment_secret.get_secret_value()
        if not hmac.compare_digest(body.enrollment_secret.encode(), expected.encode()):
            raise Refused(401, "wrong enrollment secret")
        # what the agent told us but its secret, and where we saw it come from
        registration = AgentRegistration(
            **body.model_dump(exclude={"enrollment_secret"}), observed_address=observed
        )
        try:
            creds = await self._ns.register_agent(registration)
        except ApiError as exc:
            status = exc.status if exc.status in _NS_ANSWERS_PASSED_ON else 502
            raise Refused(status, f"NS: {exc.detail}") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Refused(503, f"NS unreachable: {exc}") from None
        await self._save(
            Client(
                name=creds.name,
                token_sha256=hashlib.sha256(creds.token.encode()).hexdigest(),
                tickle_key=creds.tickle_key,
                tickle_host=body.tickle_host,
                tickle_port=body.tickle_port,
                cem=body.cem,
                reported_address=body.reported_address,
                observed_address=observed,
            )
        )
        log.info("agent %s registered (cem=%s, seen from %s)", creds.name, body.cem, observed)
        # a computer failing over brings its unfinished work: have it here before answering
        await self._sync.work.run("check")
        return AgentEnrollment(
            name=creds.name,
            token=creds.token,
            tickle_key=creds.tickle_key,
            ts_name=self._settings.name,
            policy=policy_for(self._store.settings(), body.cem),
        )

    async def _save(self, client: Client) -> None:
        """Keep `client` in this turn's group commit; return once it is durable."""
        saved = asyncio.get_running_loop().create_future()
        if not self._saving:
            asyncio.get_running_loop().call_soon(self._commit)
        self._saving.append((client, saved))
        await asyncio.shield(saved)

    def _commit(self) -> None:
        """Keep every client queued this turn, in one transaction."""
        group, self._saving = self._saving, []
        try:
            self._store.save_clients(client for client, _ in group)
        except Exception as exc:
            for _, saved in group:
                saved.set_exception(exc)
            return
        for _, saved in group:
            saved.set_result(None)
