"""The pieces of tickle.serving that need no server: the connection table, the cap, the settings."""

from __future__ import annotations

import asyncio
import gc
import resource
from typing import Any, cast

import pytest
from pydantic_settings import SettingsConfigDict

from tickle.config import ApiServerSettings, ConfigError, load_settings
from tickle.serving import (
    CROWDED_IDLE_S,
    RETRY_AFTER_S,
    CollectorPause,
    ConnectionTable,
    LimitedHttpProtocol,
    connection_cap,
    raise_open_file_limit,
    refusal_response,
)


class Conn:
    """Stands for a connection: remembers that it was closed to make room."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.evicted = False

    def evict(self) -> None:
        self.evicted = True


def _conns(*names: str) -> list[Any]:
    return [cast(LimitedHttpProtocol, Conn(n)) for n in names]


def test_at_the_cap_the_connection_waiting_longest_makes_room() -> None:
    table = ConnectionTable(cap=3)
    a, b, c, d = _conns("a", "b", "c", "d")
    for conn in (a, b, c):
        assert table.admit(conn)
    assert table.admit(d)
    assert (a.evicted, b.evicted, c.evicted) == (True, False, False)
    assert len(table) == 3


def test_connections_being_served_are_never_closed_to_make_room() -> None:
    table = ConnectionTable(cap=2)
    a, b, c, d = _conns("a", "b", "c", "d")
    table.admit(a)
    table.admit(b)
    table.served(a)  # a's request is complete: the server's turn
    assert table.admit(c)
    assert (a.evicted, b.evicted) == (False, True)
    table.served(c)
    assert not table.admit(d)  # every connection is being served: refuse the new one
    assert len(table) == 2


def test_crowded_room_is_made_by_closing_connections_idle_a_while_never_one_served() -> None:
    now = [0.0]
    table = ConnectionTable(cap=8, clock=lambda: now[0])  # crowded at 6
    conns = _conns(*"abcdefg")
    a, b, c, d, e, f, g = conns
    for conn in (a, b, c, d):
        table.admit(conn)
    assert table.room()  # 4 open
    assert not table.room(coming=2)  # 2 more on their way would crowd it: nothing idle yet
    table.served(a)  # being served: never closed for room
    now[0] = CROWDED_IDLE_S  # b, c and d have waited that long
    table.admit(e)
    table.admit(f)  # crowded
    assert table.room()  # made: b, the longest waiting
    assert [x.name for x in conns if x.evicted] == ["b"]
    assert table.room(coming=2)  # c and d too
    assert [x.name for x in conns if x.evicted] == ["b", "c", "d"]
    table.admit(g)
    table.served(e)
    table.served(g)
    assert not table.room(coming=2)  # f waited less than CROWDED_IDLE_S, the rest are served
    assert [x.name for x in conns if x.evicted] == ["b", "c", "d"]
    assert len(table) == 4


def test_a_connection_answered_waits_again_from_the_end_of_the_line() -> None:
    table = ConnectionTable(cap=2)
    a, b, c = _conns("a", "b", "c")
    table.admit(a)
    table.admit(b)
    table.served(a)
    table.waiting(a)  # answered, kept alive: now it has waited less than b
    table.admit(c)
    assert (a.evicted, b.evicted) == (False, True)


@pytest.mark.parametrize(
    ("max_connections", "open_files", "cap"),
    [(4096, 65536, 4096), (4096, 1024, 768), (4096, 256, 128), (100, 1024, 100)],
)
def test_the_cap_leaves_descriptors_for_the_rest(
    max_connections: int, open_files: int, cap: int
) -> None:
    assert connection_cap(max_connections, open_files) == cap


def test_the_soft_open_file_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 512:
        pytest.skip(f"hard limit {hard}")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        assert raise_open_file_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class ServerSettings(ApiServerSettings):
    model_config = SettingsConfigDict(env_prefix="TICKLE_X_", extra="forbid", validate_default=True)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (
            ["--max-connections", "5"],
            "max_connections (--max-connections, TICKLE_X_MAX_CONNECTIONS): must be at least 16",
        ),
        (["--request-head-timeout-s", "0"], "request_head_timeout_s"),
        (
            ["--max-body-bytes", "1000"],
            "max_body_bytes (--max-body-bytes, TICKLE_X_MAX_BODY_BYTES)",
        ),
        (
            ["--max-body-bytes", "65536", "--max-registration-body-bytes", "100000"],
            "max_registration_body_bytes (--max-registration-body-bytes, "
            "TICKLE_X_MAX_REGISTRATION_BODY_BYTES): "
            "must not exceed max_body_bytes (65536)",
        ),
    ],
)
def test_a_bad_limit_is_refused_naming_the_setting(args: list[str], named: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(ServerSettings, args)
    lines = str(refused.value).splitlines()
    assert len(lines) == 1, lines  # one line, naming the setting
    assert named in lines[0]


def test_a_long_poll_is_parked_beside_the_cap_and_never_closed_for_another() -> None:
    table = ConnectionTable(cap=2, long_poll_cap=1)
    a, b, c, d = _conns("a", "b", "c", "d")
    table.admit(a)
    table.park(a)  # a long-poll: out of the cap's count
    assert (len(table), table.parked) == (0, 1)
    table.admit(b)
    table.admit(c)
    assert table.admit(d)  # at the cap: b, waiting longest, makes room; a is never a candidate
    assert (a.evicted, b.evicted) == (False, True)
    table.park(c)  # past long_poll_cap: served like any request, in the cap's count
    assert (len(table), table.parked) == (2, 1)
    table.waiting(a)  # answered: a kept-alive connection like any other
    assert (len(table), table.parked) == (3, 0)


def test_a_refusal_for_lack_of_room_says_when_to_try_again() -> None:
    """A 503 (no room for the connection) carries Retry-After, which agents wait at least."""
    head, _, body = refusal_response(503, "no room").partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    assert f"retry-after: {RETRY_AFTER_S}".encode() in lines[1:]
    assert RETRY_AFTER_S >= 1
    assert body == b'{"detail": "no room"}'
    # a refusal for the request itself (too large, too slow) is not to be tried again as it is
    assert not any(
        line.startswith(b"retry-after")
        for line in refusal_response(413, "too large").split(b"\r\n")
    )


async def test_a_collector_pause_puts_off_the_passes_until_the_burst_is_over_and_its_objects_gone() -> (
    None
):
    before = gc.get_threshold()
    young = [before[0]]  # the collector's count of new objects, as the pause reads it
    pause = CollectorPause(
        threshold=before[0] + 123_456, max_s=30, check_s=0.01, young=lambda: young[0]
    )
    try:
        pause.busy(True)
        assert gc.get_threshold() == (before[0] + 123_456, *before[1:])
        pause.busy(True)  # still the same burst
        pause.busy(False)  # over, but what it made is still there: a pass would be due
        await asyncio.sleep(0.05)
        assert pause.paused
        assert gc.get_threshold()[0] == before[0] + 123_456
        young[0] = before[0] - 1  # freed: no pass due at the usual threshold
        await _resumed(pause)
        assert gc.get_threshold() == before
        pause.busy(True)
        pause.busy(False)  # nothing left over: at once
        assert not pause.paused
        assert gc.get_threshold() == before
    finally:
        pause.busy(False)
    assert gc.get_threshold() == before


async def test_a_collector_pause_lasts_max_s_at_most() -> None:
    before = gc.get_threshold()
    pause = CollectorPause(threshold=before[0] + 1, max_s=0.05, young=lambda: 10**9)
    try:
        pause.busy(True)
        assert pause.paused
        await _resumed(pause)  # a burst longer than max_s: the passes come again
        assert gc.get_threshold() == before
    finally:
        pause.busy(False)
    assert gc.get_threshold() == before


async def test_a_collector_pause_leaves_a_disabled_collector_alone() -> None:
    before = gc.get_threshold()
    gc.disable()
    try:
        pause = CollectorPause(threshold=before[0] + 1, max_s=30)
        pause.busy(True)
        assert not pause.paused
        assert gc.get_threshold() == before
    finally:
        gc.enable()


async def _resumed(pause: CollectorPause) -> None:
    """Wait (5 s at most) until `pause` gives the collector its thresholds back."""
    async with asyncio.timeout(5):
        while pause.paused:
            await asyncio.sleep(0.01)
