"""The agent's retry schedules, in one place: the simulated agents of the bench use them too.

Every one draws its delays with full jitter (see tickle.backoff): the agents of a task server that
restarted failed together, and must come back spread over the window, not in waves. Every retry
also waits what a busy task server's `Retry-After` asked, then its own delay on top.
"""

from __future__ import annotations

from tickle.backoff import Backoff

# registering, while no task server accepts the registration
REGISTER = Backoff(base_s=1.0, max_s=60.0, tries=None, full_jitter=True)
# a pull (or poll) that failed: the next poll comes this soon, not a whole interval later
PULL = Backoff(base_s=5.0, max_s=300.0, tries=None, full_jitter=True)
# the long-poll, after a failed one (task server down, refusing): every CEM agent of a task
# server that restarted loses its long-poll at the same moment; drawn over a steady 20 s window
# (for about a minute and a half, then growing), they come back at an even rate, and work that
# arrived meanwhile is answered at once when the long-poll is armed again
LONG_POLL = Backoff(base_s=20.0, max_s=60.0, tries=None, full_jitter=True, flat_tries=9)
# status events the task server did not take (the outbox forwarder)
EVENTS = Backoff(base_s=0.2, max_s=10.0, tries=None, full_jitter=True)
# the long-poll, after an answer: armed again after a short random pause
LONG_POLL_REARM_S = (0.05, 0.5)
