"""The agents' pulls at their task server: their tasks, and their configuration policy.

Only a pull a tickle caused acknowledges that tickle (a poll does not: its tickle may have been
dropped), and it does so before the work is read, so work cached after that point gets a tickle of
its own. A pull from a new address is told to the NS (NAT shows as a difference).

A long-poll (an agent that cannot be tickled, with the NS's `long_poll` setting on) is answered at
once when the agent has work it has not pulled or an older settings version; else it waits until
something arrives for the agent (then it is the pull, via `long_poll`) or returns empty (None).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from tickle import wire
from tickle.messages import (
    AgentPolicy,
    AgentTasks,
    PolicyVia,
    PullVia,
    SettingsOut,
)
from tickle.metrics import ComponentMetrics
from tickle.taskserver.agent_tickler import AgentTickler
from tickle.taskserver.long_polls import LongPolls
from tickle.taskserver.policy import policy_for
from tickle.taskserver.refusal import Refused
from tickle.taskserver.state_reporter import StateReporter
from tickle.taskserver.store import CachedWork, Client, Store
from tickle.taskserver.work_cache import WorkCache


class AgentPulls:
    """Answers an agent's pulls from the work cache and the stored settings."""

    def __init__(
        self,
        store: Store,
        work_cache: WorkCache,
        agents: AgentTickler,
        reporter: StateReporter,
        metrics: ComponentMetrics,
        long_polls: LongPolls | None = None,
    ) -> None:
        self._long_polls = long_polls
        if long_polls is not None:
            long_polls.respond = self.answer_woken
        self._store = store
        self._work_cache = work_cache
        self._agents = agents
        self._reporter = reporter
        self._metrics = metrics
        # the policies of the stored settings (the object they are made of), with their JSON:
        # (cem, unreachable) -> policy; made again when the settings change
        self._policies_of: SettingsOut | None = None
        self._policies: dict[tuple[bool, bool], tuple[AgentPolicy, str]] = {}

    async def tasks(
        self, agent: Client, via: PullVia, peer: str | None, settings_version: int | None = None
    ) -> AgentTasks:
        """The agent's unfinished executions and its policy; `peer`: the address it pulled from,
        `settings_version`: the version it reported having."""
        work, (policy, _), cancel = self._pull(agent, via, peer, settings_version)
        return AgentTasks(executions=[w.work for w in work], policy=policy, cancel=cancel)

    def tasks_json(
        self, agent: Client, via: PullVia, peer: str | None, settings_version: int | None = None
    ) -> bytes:
        """`tasks`, as the JSON of its answer, made of the JSON the cache keeps of each work and
        of the policy (an `AgentTasks` made and written per pull cost ~3 times as much); made at
        once (nothing awaited), so the agent API answers it as soon as it is read."""
        work, (_, policy), cancel = self._pull(agent, via, peer, settings_version)
        executions = ",".join([w.json for w in work])
        cancels = ",".join(map(str, cancel))
        return f'{{"executions":[{executions}],"policy":{policy},"cancel":[{cancels}]}}'.encode()

    def _pull(
        self, agent: Client, via: PullVia, peer: str | None, settings_version: int | None
    ) -> tuple[list[CachedWork], tuple[AgentPolicy, str], list[int]]:
        """What `tasks` does: the work, the policy (with its JSON) and the cancels to answer."""
        if via == "tickle":
            self._agents.ack(agent.name, wire.Kind.TASKS)
        self._metrics.pulls_by(via).inc()
        if via == "poll":
            self._metrics.polls.inc()
        self._note_address(agent, peer)
        work = self._work_cache.pulled(agent.name, via)
        policy = self._policy_and_json(agent)
        self.contact(agent, settings_version, policy[0])
        return work, policy, self._work_cache.cancels_for(agent.name)

    async def long_poll(
        self,
        agent: Client,
        peer: str | None,
        settings_version: int | None = None,
        receive: Callable[[], Awaitable[Any]] | None = None,
    ) -> AgentTasks | None:
        """Wait (at most the policy's long-poll timeout) for something to arrive for the agent;
        then its pull (via `long_poll`), or None: nothing came. 409 when long-poll is not on for
        this agent (its policy says so). `receive`: the request's, to notice a client gone."""
        policy = self._policy(agent)
        if not policy.long_poll or self._long_polls is None:
            raise Refused(
                409, f"long-poll is off for {agent.name!r} (its policy says so): poll instead"
            )
        self.contact(agent, settings_version)
        if self._has_news(agent, settings_version, policy):
            return await self.tasks(agent, "long_poll", peer, settings_version)
        answer = await self._long_polls.wait(agent.name, policy.long_poll_timeout_s, receive)
        if answer is not None:
            self._note_address(agent, peer)
        return answer

    async def answer_woken(self, names: list[str]) -> dict[str, AgentTasks]:
        """The answers of these agents' long-polls, woken together: their pulls (via
        `long_poll`), made at once."""
        clients = [c for n in names if (c := self._store.client(n)) is not None]
        pulled = self._work_cache.pulled_many([c.name for c in clients], "long_poll")
        self._metrics.pulls_by("long_poll").inc(len(clients))
        answers = {}
        settings = self._store.settings()  # read once for all of them
        for client in clients:
            policy = policy_for(settings, client.cem, client.name in self._agents.unreachable)
            self.contact(client, None, policy)
            answers[client.name] = AgentTasks(
                executions=pulled[client.name],
                policy=policy,
                cancel=self._work_cache.cancels_for(client.name),
            )
        return answers

    def _has_news(self, agent: Client, settings_version: int | None, policy: AgentPolicy) -> bool:
        """Whether the agent has work it has not pulled yet, or settings it does not have."""
        if settings_version is not None and settings_version < policy.settings_version:
            return True
        cancelled = self._store.cancelled  # never handed out: not news
        return any(
            not w.agent_pulled and w.execution_id not in cancelled
            for w in self._store.pending_work(agent.name)
        )

    def policy(
        self, agent: Client, via: PolicyVia, settings_version: int | None = None
    ) -> AgentPolicy:
        """The agent's policy; a fetch the settings tickle caused acknowledges it."""
        if via == "tickle":
            self._agents.ack(agent.name, wire.Kind.SETTINGS)
        policy = self._policy(agent)
        self.contact(agent, settings_version, policy)
        return policy

    def contact(
        self, agent: Client, settings_version: int | None, answer: AgentPolicy | None = None
    ) -> None:
        """Note the agent's contact for the NS (batched); an answer carrying a policy gives it
        that version (an agent takes any version not older than its own)."""
        if answer is not None and answer.settings_version > 0:
            settings_version = max(settings_version or 0, answer.settings_version)
        self._reporter.contact(agent.name, settings_version)

    def _policy(self, agent: Client) -> AgentPolicy:
        return self._policy_and_json(agent)[0]

    def _policy_and_json(self, agent: Client) -> tuple[AgentPolicy, str]:
        settings = self._store.settings()
        if settings is not self._policies_of or settings is None:
            self._policies_of = settings
            self._policies = {}
        key = (agent.cem, agent.name in self._agents.unreachable)
        made = self._policies.get(key)
        if made is None:
            policy = policy_for(settings, *key)
            made = self._policies[key] = (policy, policy.model_dump_json())
        return made

    def _note_address(self, agent: Client, peer: str | None) -> None:
        if peer is None or peer == agent.observed_address:
            return
        self._store.set_observed_address(agent.name, peer)
        self._reporter.note(agent.name, time.time(), observed_address=peer)
