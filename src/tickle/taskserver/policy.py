"""The agent's configuration policy: the NS's central settings as the task server hands them down.

A policy never carries tasks. Until the NS has handed down its settings, it holds the spec's
defaults.
"""

from __future__ import annotations

from tickle.messages import AgentPolicy, SettingsOut

DEFAULT_INTERVAL_S = 1800
DEFAULT_JITTER = 0.1


def policy_for(settings: SettingsOut | None, cem: bool) -> AgentPolicy:
    """The policy of an agent (in CEM mode or not) under the NS's `settings`."""
    if settings is None:
        return AgentPolicy(
            settings_version=0,
            task_request_interval_s=DEFAULT_INTERVAL_S,
            poll_jitter_fraction=DEFAULT_JITTER,
            cem=cem,
        )
    return AgentPolicy(
        settings_version=settings.version,
        task_request_interval_s=settings.task_request_interval_s,
        poll_jitter_fraction=settings.poll_jitter_fraction,
        cem=cem,
    )
