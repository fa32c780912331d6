"""The task server's delay-based agent tickle window (its settings' defaults, with
agent_tickle_window_target_s 0.5 s): after a restart it does not send the whole window to a server
serving its pulls slowly, and it opens fully when they come fast."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

from tickle import wire
from tickle.backoff import Backoff
from tickle.metrics import ComponentMetrics
from tickle.taskserver.agent_tickler import WINDOW_GROWTH
from tickle.taskserver.settings import TaskServerSettings
from tickle.tickling import Tickler

KEY = b"k" * 32
FIELDS = TaskServerSettings.model_fields
WINDOW = FIELDS["agent_tickle_window"].default
TARGET_S = 0.5  # agent_tickle_window_target_s (default 0: a fixed window)


class Clock:
    """The window's clock: pulls come when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def restarted(clock: Clock, agents: int) -> AsyncIterator[tuple[Tickler, list[str]]]:
    """A task server's tickler as just started (its default window settings), asked to tickle
    `agents` agents at once (their tickles all go to one socket nobody reads); and the agents in
    the order their tickles were first sent."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sent: list[str] = []
    tickler = Tickler(
        "ts1",
        lambda name: KEY,
        ComponentMetrics("t"),
        Backoff(base_s=30, tries=2, jitter=0),  # no resend during the test
        on_sent=lambda name, kind, at: sent.append(name),
        window=WINDOW,
        reads_after_ack=True,
        window_initial=FIELDS["agent_tickle_window_initial"].default,
        window_growth=WINDOW_GROWTH,
        window_target_s=TARGET_S,
    )
    assert tickler._window is not None
    tickler._window.clock = clock
    await tickler.start(("127.0.0.1", 0))
    try:
        for i in range(agents):
            tickler.tickle(f"a{i}", sink.getsockname(), wire.Kind.TASKS)
        await settle(sent)
        yield tickler, sent
    finally:
        await tickler.close()
        sink.close()


async def settle(sent: list[str]) -> None:
    """Let the released sends run: until a round of loop turns sends nothing more."""
    while True:
        before = len(sent)
        for _ in range(20):
            await asyncio.sleep(0)
        if len(sent) == before:
            return


async def test_after_a_restart_a_server_serving_pulls_slowly_is_not_sent_the_whole_window() -> None:
    clock = Clock()
    target_s = TARGET_S
    async with restarted(clock, 600) as (tickler, sent):
        first = len(sent)
        assert 0 < first <= 64  # the old window sent all 512 at once
        # the server serves one pull every 0.1 s, in the order tickled
        served, most_waiting = 0, first
        for _ in range(200):
            clock.now += 0.1
            assert tickler.ack(sent[served], wire.Kind.TASKS)
            served += 1
            await settle(sent)
            most_waiting = max(most_waiting, len(sent) - served)
        # a few more while the first pulls came within the target, then back to the opening
        assert most_waiting <= first + int(target_s / 0.1)
        assert len(sent) - served <= first


async def test_the_window_opens_fully_within_a_few_rounds_of_fast_pulls() -> None:
    clock = Clock()
    async with restarted(clock, 1600) as (tickler, sent):
        rounds = [len(sent)]
        served = 0
        while len(sent) - served < WINDOW and len(rounds) < 10:
            clock.now += 0.001
            for name in sent[served:]:  # every pull waiting is served at once, fast
                assert tickler.ack(name, wire.Kind.TASKS)
            served = len(sent)
            await settle(sent)
            rounds.append(len(sent) - served)
        assert rounds[-1] == WINDOW, rounds
        # by half each round: 32, 48, 72, 108, 162, 243, 364, 512
        assert len(rounds) <= 8, rounds


async def test_an_agent_slow_to_answer_closes_the_window_only_until_its_own_pace_is_known() -> None:
    clock = Clock()
    async with restarted(clock, 32) as (tickler, sent):
        first = len(sent)
        near, far = sent[: first // 2], sent[first // 2 :]
        for rnd in range(2):
            start = clock.now
            if rnd:  # the same agents again, and more waiting behind them
                for name in [*near, *far, *(f"b{i}" for i in range(200))]:
                    tickler.tickle(name, ("127.0.0.1", 9), wire.Kind.TASKS)
                await settle(sent)
            clock.now = start + 0.001  # the near ones answer at once
            for name in near:
                assert tickler.ack(name, wire.Kind.TASKS)
            clock.now = start + 2.0  # the far ones 2 s later, however idle the server
            for name in far:
                assert tickler.ack(name, wire.Kind.TASKS)
            await settle(sent)
        # first round: the far ones looked queued (one place closed each, more than the near
        # opened: back to the opening); second: each at its own pace, all opened half a place
        waiting = [n for n in sent[first:] if tickler.in_flight(n, wire.Kind.TASKS)]
        assert len(waiting) == first + first // 2
