"""The agent's configuration policy: the NS's central settings as the task server hands them down.

A policy never carries tasks. Until the NS has handed down its settings, it holds the spec's
defaults. Long-poll is on in an agent's policy only when the NS's `long_poll` setting is on and
the agent cannot be tickled: it is in CEM mode, or its tickles do not reach it.
"""

from __future__ import annotations

from tickle.messages import LONG_POLL_TIMEOUT_S, AgentPolicy, SettingsOut

DEFAULT_INTERVAL_S = 1800
DEFAULT_JITTER = 0.1


def policy_for(settings: SettingsOut | None, cem: bool, unreachable: bool = False) -> AgentPolicy:
    """The policy of an agent (in CEM mode or not, tickle-unreachable or not) under the NS's
    `settings`."""
    if settings is None:
        return AgentPolicy(
            settings_version=0,
            task_request_interval_s=DEFAULT_INTERVAL_S,
            poll_jitter_fraction=DEFAULT_JITTER,
            cem=cem,
            long_poll=False,
            long_poll_timeout_s=LONG_POLL_TIMEOUT_S,
        )
    return AgentPolicy(
        settings_version=settings.version,
        task_request_interval_s=settings.task_request_interval_s,
        poll_jitter_fraction=settings.poll_jitter_fraction,
        cem=cem,
        long_poll=settings.long_poll and (cem or unreachable),
        long_poll_timeout_s=settings.long_poll_timeout_s,
    )
