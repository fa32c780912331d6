"""A connection's front (`tickle.front.AtOnceFront`): the requests a fast path answers at once
answered there, anything else handed over to `LimitedHttpProtocol` from its first byte; over real
HTTP on loopback, against the app of the fast-lane tests."""

from __future__ import annotations

import asyncio
import functools
import gc
import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from uvicorn.server import ServerState

from tests.shared.conftest import serving_app
from tests.shared.test_fast_lane import (
    PING,
    Answer,
    CountedClock,
    EchoFastPath,
    _app,
    _connect,
    _get,
    _post,
    _read_answer,
)
from tickle import serving
from tickle.config import ApiServerSettings
from tickle.front import AtOnceFront
from tickle.metrics import ComponentMetrics
from tickle.serving import LimitedHttpProtocol, RequestHold, ServingConfig

HANDED: list[LimitedHttpProtocol] = []  # each connection handed over, in order


@pytest.fixture(autouse=True)
def _watch_hand_overs(monkeypatch: pytest.MonkeyPatch) -> None:
    hand_over = AtOnceFront.hand_over

    def watched(self: AtOnceFront, *args: Any, **kwargs: Any) -> LimitedHttpProtocol:
        HANDED.append(hand_over(self, *args, **kwargs))
        return HANDED[-1]

    monkeypatch.setattr(AtOnceFront, "hand_over", watched)
    HANDED.clear()
    CountedClock.calls = 0
    EchoFastPath.offered.clear()
    EchoFastPath.tasks.clear()
    EchoFastPath.arrived.clear()


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with serving_app(_app(), http=AtOnceFront) as (number, _config):
        yield number


async def _answer(reader: asyncio.StreamReader) -> Answer:
    async with asyncio.timeout(5):
        return await _read_answer(reader)


async def _closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sends until it closes the connection (within 5 s)."""
    async with asyncio.timeout(5):
        return await reader.read()


async def test_requests_answered_at_once_stay_at_the_front_until_another_comes(port: int) -> None:
    reader, writer = await _connect(port)
    try:
        for _ in range(3):
            writer.write(_get("/now"))
            status, headers, body = await _answer(reader)
            assert (status, body) == (200, {"now": True})  # its arrival noted
            assert "x-tickle-time" in headers
            assert "connection" not in headers  # kept alive
        assert HANDED == []
        writer.write(_post("/echo", b"[1]"))  # anything else: handed over, and served
        assert (await _answer(reader))[::2] == (200, {"fast": 3})
        assert len(HANDED) == 1
        writer.write(_get("/now"))  # by the protocol now, still at once
        assert (await _answer(reader))[::2] == (200, {"now": True})
    finally:
        writer.close()
    assert len(HANDED) == 1
    assert EchoFastPath.tasks == [False] * 4  # none in a task
    assert CountedClock.calls == 0


@pytest.mark.parametrize(
    ("request_bytes", "statuses"),
    [
        (_get("/now") * 2, [200, 200]),  # two in one read
        (_get("/now?n=pass"), [200]),  # passed on: the route answers
        (PING, [200]),  # another of the fast path's
        (b"GET /now HTTP/1.1\r\nHost: t\r\n\r", [200]),  # split over two reads
        (_get("/now", extra="Content-Length: 2\r\n") + b"{}", [200]),  # with a body
        (_get("/now", extra="Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n", [200]),
        (_get("/now", extra="X-Forwarded-For: 10.0.0.1\r\n"), [200]),
        (_get("/n%6fw"), [200]),
        (b"NOT HTTP AT ALL\r\n\r\n", [400]),
        (_get("/now", extra="X-Big: " + "a" * 17000 + "\r\n"), [431]),
    ],
    ids=[
        "pipelined",
        "passed-on",
        "ping",
        "split",
        "body",
        "chunked",
        "proxy",
        "escaped",
        "bad",
        "large",
    ],
)
async def test_a_read_the_front_does_not_answer_is_handed_over_from_its_first_byte(
    port: int, request_bytes: bytes, statuses: list[int]
) -> None:
    reader, writer = await _connect(port)
    try:
        if request_bytes.endswith(b"\r\n\r"):  # split: the rest once the first part is handed
            writer.write(request_bytes)
            async with asyncio.timeout(5):
                while not HANDED:
                    await asyncio.sleep(0.01)
            writer.write(b"\n")
        else:
            writer.write(request_bytes)
        answered = []
        for _ in statuses:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            answered.append(int(head.split()[1]))
            length = [h for h in head.lower().split(b"\r\n") if h.startswith(b"content-length")]
            await reader.readexactly(int(length[0].split(b":")[1]))
    finally:
        writer.close()
    assert answered == statuses
    assert len(HANDED) == 1
    if b"n=pass" in request_bytes:
        assert EchoFastPath.offered == ["now"]  # offered once, at the front


@pytest.mark.parametrize(
    "extra", ["Connection: close\r\n", None], ids=["connection-close", "http-1.0"]
)
async def test_a_request_that_closes_its_connection_is_answered_and_the_connection_closed(
    port: int, extra: str | None
) -> None:
    reader, writer = await _connect(port)
    try:
        if extra is None:
            writer.write(b"GET /now HTTP/1.0\r\nHost: t\r\n\r\n")
        else:
            writer.write(_get("/now", extra=extra))
        answer = await _closed(reader)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"now": True}
    assert b"connection: close" in answer.lower()


async def test_a_silent_connection_is_refused_at_the_head_deadline() -> None:
    limits = ApiServerSettings(request_head_timeout_s=0.2)
    async with serving_app(_app(), limits, http=AtOnceFront) as (number, config):
        reader, writer = await _connect(number)
        try:
            started = time.monotonic()
            answer = await _closed(reader)
        finally:
            writer.close()
        refused = config.metrics.http_refused.labels(reason="head_timeout")._value.get()
    assert answer.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started >= 0.15
    assert refused == 1


async def test_a_connection_answered_at_the_front_is_closed_after_the_keep_alive() -> None:
    async with serving_app(_app(), timeout_keep_alive=0.2, http=AtOnceFront) as (number, _c):
        reader, writer = await _connect(number)
        try:
            writer.write(_get("/now"))
            assert (await _answer(reader))[0] == 200
            started = time.monotonic()
            assert await _closed(reader) == b""  # closed by the server, nothing more said
        finally:
            writer.close()
    assert time.monotonic() - started >= 0.15
    assert HANDED == []


async def test_a_closed_connection_leaves_no_cycle_for_the_garbage_collector() -> None:
    """A fan-out's connections are freed by their reference counts once closed (what
    `serving.CollectorPause` counts on): no protocol, parser or transport of theirs is left in
    a cycle only the cyclic collector would free."""
    kinds = (AtOnceFront, LimitedHttpProtocol, serving.LingeringTransport)
    async with serving_app(_app(), http=AtOnceFront) as (number, config):
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)  # what a pass finds unreachable is kept, to be looked at
        try:
            for handed_over in (False, True, False, True):
                reader, writer = await _connect(number)
                writer.write(_get("/now"))  # answered at the front
                assert (await _answer(reader))[0] == 200
                if handed_over:  # anything else: served by `LimitedHttpProtocol` after it
                    writer.write(_post("/echo", b"[1]"))
                    assert (await _answer(reader))[0] == 200
                writer.close()
                await writer.wait_closed()
            async with asyncio.timeout(5):  # the server saw them go
                while len(config.connections):
                    await asyncio.sleep(0.01)
            assert len(HANDED) == 2
            HANDED.clear()  # the test's own references
            gc.collect()
            left = [type(o).__name__ for o in gc.garbage if isinstance(o, kinds)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
    assert left == []


async def test_at_the_cap_the_front_connection_waiting_longest_is_closed_for_a_new_one() -> None:
    limits = ApiServerSettings(max_connections=16)
    async with serving_app(_app(), limits, http=AtOnceFront) as (number, config):
        assert config.connections.cap == 16
        opened = [await _connect(number) for _ in range(16)]
        try:
            for reader, writer in opened:  # each answered, waiting for its next request
                writer.write(_get("/now"))
                assert (await _answer(reader))[0] == 200
            reader, writer = await _connect(number)
            opened.append((reader, writer))
            writer.write(_get("/now"))
            assert (await _answer(reader))[0] == 200  # the new one is served
            assert await _closed(opened[0][0]) == b""  # the one waiting longest: closed
            evicted = config.metrics.http_refused.labels(reason="evicted")._value.get()
        finally:
            for _reader, writer in opened:
                writer.close()
    assert evicted == 1


class _Spell:
    """A `RequestHold` whose spell the test ends: after GET /now, POST /echo waits for it."""

    def __init__(self) -> None:
        self.busy = True
        self.over = asyncio.Event()
        self.hold = RequestHold(["/now"], ["/echo"], lambda: self.busy, self._settled, 5.0)

    async def _settled(self, bound_s: float) -> None:
        async with asyncio.timeout(bound_s):
            await self.over.wait()

    async def held(self) -> None:
        """Once a request is put off (within 5 s)."""
        async with asyncio.timeout(5):
            while not self.hold.held:
                await asyncio.sleep(0.01)

    def end(self) -> float:
        self.busy = False
        self.over.set()
        return time.time()


async def test_the_request_after_an_answer_at_once_is_kept_unread_while_the_spell_lasts() -> None:
    spell = _Spell()
    async with serving_app(_app(), request_hold=spell.hold, http=AtOnceFront) as (number, _c):
        reader, writer = await _connect(number)
        try:
            writer.write(_get("/now"))
            assert (await _answer(reader))[0] == 200
            writer.write(_post("/echo", b"[1]"))
            sent = time.time()
            await spell.held()
            with pytest.raises(TimeoutError):  # not served while the spell lasts
                async with asyncio.timeout(0.3):
                    await reader.readuntil(b"\r\n\r\n")
            assert HANDED == []  # not even parsed: still at the front
            assert EchoFastPath.offered == ["now"]
            ended = spell.end()
            assert (await _answer(reader))[::2] == (200, {"fast": 3})
        finally:
            writer.close()
    assert len(HANDED) == 1
    # it arrived when it was read, not when the spell ended
    assert sent - 0.1 <= EchoFastPath.arrived[0] < ended


async def test_only_a_request_the_hold_puts_off_waits_for_the_spell() -> None:
    spell = _Spell()
    async with serving_app(_app(), request_hold=spell.hold, http=AtOnceFront) as (number, _c):
        reader, writer = await _connect(number)
        try:
            writer.write(_get("/now"))
            assert (await _answer(reader))[0] == 200
            writer.write(PING)  # not one the hold puts off: served while the spell lasts
            assert (await _answer(reader))[::2] == (200, {"pong": True})
            writer.write(_get("/now"))
            assert (await _answer(reader))[0] == 200
        finally:
            writer.close()
    assert spell.hold.held == 0
    assert spell.busy  # the spell never ended


async def test_a_request_kept_whose_client_went_away_is_let_go_with_the_spell() -> None:
    spell = _Spell()
    async with serving_app(_app(), request_hold=spell.hold, http=AtOnceFront) as (number, _c):
        reader, writer = await _connect(number)
        writer.write(_get("/now"))
        assert (await _answer(reader))[0] == 200
        writer.write(_post("/echo", b"[1]"))
        await spell.held()
        writer.close()
        await writer.wait_closed()
        spell.end()
        async with asyncio.timeout(5):
            while spell.hold.held or spell.hold._releasing is not None:
                await asyncio.sleep(0.01)
        reader, writer = await _connect(number)  # the server serves on
        try:
            writer.write(_get("/now"))
            assert (await _answer(reader))[::2] == (200, {"now": True})
        finally:
            writer.close()


async def test_the_server_stops_with_connections_waiting_at_the_front() -> None:
    async with serving_app(_app(), http=AtOnceFront) as (number, _config):
        reader, writer = await _connect(number)
        writer.write(_get("/now"))
        assert (await _answer(reader))[0] == 200
        stopping = time.monotonic()
    try:
        assert await _closed(reader) == b""
    finally:
        writer.close()
    assert time.monotonic() - stopping < 5  # uvicorn did not wait on it


async def test_the_front_stands_aside_where_something_would_change_a_request_or_its_answer() -> (
    None
):
    def front(**options: Any) -> AtOnceFront:
        config = ServingConfig(_app(), ApiServerSettings(), ComponentMetrics("t"),
                               http=AtOnceFront, log_config=None, **options)  # fmt: skip
        return AtOnceFront(config, ServerState(), {}, asyncio.get_running_loop())

    assert set(front().served_now) == {("GET", "/now")}
    # every connection handed over at once
    assert front(headers=[("Connection", "keep-alive")]).served_now == {}
    assert front(root_path="/api").served_now == {}
    assert front(limit_concurrency=100).served_now == {}


@pytest.mark.parametrize("http", [AtOnceFront, LimitedHttpProtocol], ids=["front", "protocol"])
async def test_requests_are_not_held_at_the_cost_of_refusing_new_connections(
    http: type[asyncio.Protocol],
) -> None:
    # a fan-out larger than the connection cap: the connections holding an event post must not
    # fill the table, or the pulls still to come are refused (503) for the spell
    spell = _Spell()
    limits = ApiServerSettings(max_connections=16)
    options: dict[str, Any] = {"request_hold": spell.hold, "http": http}
    async with serving_app(_app(), limits, **options) as (number, config):
        opened = []
        try:
            for _ in range(24):  # each pulls, then posts its events on its connection
                reader, writer = await _connect(number)
                opened.append((reader, writer))
                writer.write(_get("/now"))
                assert (await _answer(reader))[0] == 200
                writer.write(_post("/echo", b"[1]"))
            for reader, _writer in opened[-8:]:  # the last ones' posts are served: room made
                assert (await _answer(reader))[::2] == (200, {"fast": 3})
        finally:
            for _reader, writer in opened:
                writer.close()
        refused = config.metrics.http_refused.labels(reason="over_capacity")._value.get()
    assert refused == 0
    assert spell.busy  # while the spell lasts


async def test_a_release_serves_the_requests_put_off_a_few_a_turn_with_the_loop_turning_between(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # served in one turn, a fan-out's event posts (2,500 of one task server) held its loop
    monkeypatch.setattr(serving, "SERVE_PER_TURN", 2)
    spell = _Spell()
    trace: list[str] = []
    for n in range(5):
        spell.hold.hold(functools.partial(trace.append, f"served {n}"))
    turning = True

    async def turns() -> None:  # the loop's other work, a turn at a time
        while turning:
            trace.append("turn")
            await asyncio.sleep(0)

    other = asyncio.create_task(turns())
    spell.end()
    async with asyncio.timeout(5):
        while sum(t.startswith("served") for t in trace) < 5:
            await asyncio.sleep(0)
    # put off while the release serves: waits for its own spell
    spell.busy, spell.over = True, asyncio.Event()
    spell.hold.hold(functools.partial(trace.append, "served later"))
    for _ in range(10):
        await asyncio.sleep(0)
    turning = False
    await other
    served = [t for t in trace if t.startswith("served")]
    assert served == [f"served {n}" for n in range(5)]  # each once, in order
    assert spell.hold.held == 1  # the later one still waits
    at = [trace.index(f"served {n}") for n in (0, 2, 4)]
    assert all("turn" in trace[a:b] for a, b in itertools.pairwise(at))
    assert "turn" not in trace[at[0] : trace.index("served 1")]  # two in one turn
    spell.end()
    async with asyncio.timeout(5):
        while "served later" not in trace:
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("http", [AtOnceFront, LimitedHttpProtocol], ids=["front", "protocol"])
async def test_crowded_an_answer_closes_its_connection_but_the_first_request_of_the_hold(
    http: type[asyncio.Protocol],
) -> None:
    # room for the agents still to come: an agent's connection, once its events are answered,
    # is closed while the table is crowded; its pull's is kept alive (its events follow on it)
    spell = _Spell()
    spell.busy = False  # no spell: nothing put off, only the crowd
    limits = ApiServerSettings(max_connections=16)  # crowded at 12
    async with serving_app(_app(), limits, request_hold=spell.hold, http=http) as (
        number,
        config,
    ):
        opened = [await _connect(number) for _ in range(12)]
        try:
            async with asyncio.timeout(5):
                while not config.connections.crowded():
                    await asyncio.sleep(0.01)
            reader, writer = opened[0]
            writer.write(_get("/now"))
            status, headers, _ = await _answer(reader)
            assert (status, headers.get("connection")) == (200, None)  # kept alive
            writer.write(_post("/echo", b"[1]"))
            status, headers, body = await _answer(reader)
            assert (status, body, headers.get("connection")) == (200, {"fast": 3}, "close")
            assert await _closed(reader) == b""
            for _reader, writer in opened[1:3]:  # room: no longer crowded, kept alive
                writer.write(_post("/echo", b"[1]"))
            answers = [await _answer(reader) for reader, _writer in opened[1:3]]
            assert not config.connections.crowded()
            assert [(a[0], a[1].get("connection")) for a in answers] == [(200, None)] * 2
        finally:
            for _reader, writer in opened:
                writer.close()
