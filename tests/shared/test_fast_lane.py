"""A fast path's requests served at the connection (`tickle.serving.FastLane`): over real HTTP on
loopback, against an app with the servers' middleware (ClockHeaders, BodyLimits, a FastPath)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.shared.conftest import serving_app
from tickle.config import ApiServerSettings
from tickle.fastpath import FastPath, Parts, PassOn, Replay, at_once, json_response
from tickle.front import AtOnceFront
from tickle.metrics import ComponentMetrics
from tickle.serving import ARRIVED_AT, BodyLimits, ClockHeaders, FastLane, LimitedHttpProtocol

SMALL = 16 * 1024  # ApiServerSettings' max_registration_body_bytes


class CountedClock(ClockHeaders):
    """ClockHeaders, counting the requests that went through the middleware."""

    calls = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            CountedClock.calls += 1
        await super().__call__(scope, receive, send)


class EchoFastPath(FastPath):
    """Serves GET /ping and POST /echo (the bearer token `good` only); `?n=pass` passes on after
        reading the body. Answers GET /now at once (`served_now`): `?n=pass` passes it on, `?n=fail`
        fails. `offered` records each request the fast path was offered; `tasks`, for each /now,
        whether it was served in an asyncio task (else in the protocol's callback); `arrived`, when each
    POST /echo arrived."""

    offered: list[str] = []
    tasks: list[bool] = []
    arrived: list[float] = []  # when each POST /echo arrived (`ARRIVED_AT`)

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app)
        self.served_now = {("GET", "/now"): (self._now, frozenset({"n"}))}
        self.served = {
            ("GET", "/ping"): (self._ping, frozenset()),
            ("POST", "/echo"): (self._echo, frozenset({"n"})),
            ("GET", "/now"): (at_once(self._now), frozenset({"n"})),
        }

    def _now(self, parts: Parts, scope: Scope) -> bytes:
        EchoFastPath.offered.append("now")
        EchoFastPath.tasks.append(asyncio.current_task() is not None)
        if parts.query.get("n") == "pass":
            raise PassOn
        if parts.query.get("n") == "fail":
            raise RuntimeError("the server's own error")
        return json.dumps({"now": scope["state"][ARRIVED_AT] > 0}).encode()

    async def _ping(self, parts: Parts, scope: Scope, receive: Replay, send: Send) -> None:
        EchoFastPath.offered.append("ping")
        await json_response('{"pong": true}', scope, receive, send)

    async def _echo(self, parts: Parts, scope: Scope, receive: Replay, send: Send) -> None:
        EchoFastPath.offered.append("echo")
        EchoFastPath.arrived.append(scope["state"][ARRIVED_AT])
        if parts.token != "good":
            raise PassOn  # checked before the body is read, as the servers do
        body = await receive.body()
        if parts.query.get("n") == "pass":
            raise PassOn
        await json_response(json.dumps({"fast": len(body)}), scope, receive, send)


def _app(*, extra_middleware: bool = False, body_limits: bool = True) -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"route": True}

    @app.get("/now")
    async def now() -> dict[str, bool]:
        return {"route": True}

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        await SLOW.wait()
        return {"slow": True}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"route": len(await request.body())}

    async def known(token: str, _scope: Scope) -> bool:
        return token == "good"

    app.add_middleware(EchoFastPath)
    if body_limits:
        app.add_middleware(
            BodyLimits, limits=ApiServerSettings(), metrics=ComponentMetrics("t"),
            registrations=["/register"], known_token=known,
        )  # fmt: skip
    app.add_middleware(CountedClock)
    if extra_middleware:
        app.add_middleware(GZipMiddleware)
    return app


SLOW = asyncio.Event()  # what GET /slow waits for


# each test of a request answered at once runs with the connection's front (`tickle.front`) and
# without it: what they answer is the same
PROTOCOLS = {"protocol": LimitedHttpProtocol, "front": AtOnceFront}


@pytest.fixture(params=list(PROTOCOLS))
def http(request: pytest.FixtureRequest) -> type[asyncio.Protocol]:
    return PROTOCOLS[request.param]


@pytest.fixture
async def port(http: type[asyncio.Protocol]) -> AsyncIterator[int]:
    async with serving_app(_app(), http=http) as (number, config):
        assert config.fast_lane is not None
        CountedClock.calls = 0
        EchoFastPath.offered.clear()
        EchoFastPath.tasks.clear()
        yield number


Answer = tuple[int, dict[str, str], Any]


async def _read_answer(reader: asyncio.StreamReader) -> Answer:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    headers = {}
    for line in head[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, json.loads(body)


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


def _post(path: str, body: bytes, token: str = "good", extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


PING = b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n"


def _get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


def test_the_lane_is_taken_only_when_nothing_but_known_middleware_comes_before_the_fast_path() -> (
    None
):
    assert FastLane.of(_app()) is not None
    assert FastLane.of(_app(extra_middleware=True)) is None  # GZip must see every answer
    assert FastLane.of(_app(body_limits=False)) is None  # nothing would hold the bodies


async def test_a_fast_path_request_is_answered_at_the_connection_with_our_time_kept_alive(
    port: int,
) -> None:
    reader, writer = await _connect(port)
    try:
        for _ in range(2):  # one after the other on one connection
            writer.write(PING)
            status, headers, body = await _read_answer(reader)
            assert (status, body) == (200, {"pong": True})
            assert "x-tickle-time" in headers
        writer.write(PING + _post("/echo", b"[1, 2]"))  # pipelined: answered in order
        assert (await _read_answer(reader))[2] == {"pong": True}
        assert (await _read_answer(reader))[2] == {"fast": 6}
    finally:
        writer.close()
    assert EchoFastPath.offered == ["ping", "ping", "ping", "echo"]
    assert CountedClock.calls == 0  # none went through the middleware


async def test_a_request_the_fast_path_passes_on_reaches_the_route_with_its_body_offered_once(
    port: int,
) -> None:
    reader, writer = await _connect(port)
    try:
        writer.write(_post("/echo?n=pass", b"x" * 100))
        status, headers, body = await _read_answer(reader)
    finally:
        writer.close()
    assert (status, body) == (200, {"route": 100})
    assert "x-tickle-time" in headers
    assert EchoFastPath.offered == ["echo"]  # not offered again inside the app
    assert CountedClock.calls == 1


async def test_a_large_body_is_read_only_with_a_good_token(port: int) -> None:
    large = b"y" * (SMALL * 4)
    reader, writer = await _connect(port)
    try:
        writer.write(_post("/echo", large))
        assert (await _read_answer(reader))[:3:2] == (200, {"fast": len(large)})
    finally:
        writer.close()
    reader, writer = await _connect(port)
    try:
        writer.write(_post("/echo", large, token="bad"))
        status, headers, body = await _read_answer(reader)
    finally:
        writer.close()
    assert status == 401, body
    assert headers["connection"] == "close"  # its body is not read
    assert CountedClock.calls == 1  # the refused one went the whole way


async def test_a_chunked_body_goes_the_whole_way_and_is_served(port: int) -> None:
    reader, writer = await _connect(port)
    try:
        writer.write(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer good\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        status, _headers, body = await _read_answer(reader)
    finally:
        writer.close()
    assert (status, body) == (200, {"fast": 5})  # by the fast path inside the app
    assert CountedClock.calls == 1


async def test_an_http_1_0_request_is_answered_and_its_connection_closed(port: int) -> None:
    reader, writer = await _connect(port)
    try:
        writer.write(b"GET /ping HTTP/1.0\r\n\r\n")
        status, headers, body = await _read_answer(reader)
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the server
    finally:
        writer.close()
    assert (status, body, headers["connection"]) == (200, {"pong": True}, "close")
    assert CountedClock.calls == 0


async def test_a_body_sent_after_100_continue_is_read_and_served_at_the_connection(
    port: int,
) -> None:
    reader, writer = await _connect(port)
    try:
        writer.write(_post("/echo", b"", extra="Expect: 100-continue\r\n").replace(
            b"Content-Length: 0", b"Content-Length: 4"))  # fmt: skip
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"[42]")
        status, _headers, body = await _read_answer(reader)
    finally:
        writer.close()
    assert (status, body) == (200, {"fast": 4})
    assert CountedClock.calls == 0


async def test_requests_pipelined_behind_one_passed_on_are_answered_in_order(port: int) -> None:
    reader, writer = await _connect(port)
    try:
        writer.write(_post("/echo?n=pass", b"[1]") + PING + _post("/echo", b"[1, 2, 3]"))
        answers = [await _read_answer(reader) for _ in range(3)]
    finally:
        writer.close()
    assert [body for _, _, body in answers] == [{"route": 3}, {"pong": True}, {"fast": 9}]
    assert CountedClock.calls == 1  # only the one passed on went the whole way


async def test_a_request_answered_at_once_is_answered_in_the_protocol_in_order_kept_alive(
    port: int,
) -> None:
    reader, writer = await _connect(port)
    try:
        for _ in range(2):  # one after the other on one connection
            writer.write(_get("/now"))
            status, headers, body = await _read_answer(reader)
            assert (status, body) == (200, {"now": True})  # its arrival noted
            assert "x-tickle-time" in headers
            assert "connection" not in headers
        writer.write(_get("/now") * 3)  # pipelined
        assert [(await _read_answer(reader))[2] for _ in range(3)] == [{"now": True}] * 3
        assert EchoFastPath.tasks == [False] * 5  # none in a task
        # pipelined between others, served in tasks: answered in order
        writer.write(_get("/now") + _post("/echo", b"[1]") + _get("/now") + PING + _get("/now"))
        answers = [(await _read_answer(reader))[2] for _ in range(5)]
    finally:
        writer.close()
    assert answers == [{"now": True}, {"fast": 3}, {"now": True}, {"pong": True}, {"now": True}]
    assert CountedClock.calls == 0


async def test_a_request_answered_at_once_passed_on_or_with_a_body_is_served_in_a_task(
    port: int,
) -> None:
    reader, writer = await _connect(port)
    try:
        writer.write(_get("/now?n=pass"))
        assert (await _read_answer(reader))[::2] == (200, {"route": True})
        writer.write(_get("/now", extra="Content-Length: 2\r\n") + b"{}")
        assert (await _read_answer(reader))[::2] == (200, {"now": True})
        writer.write(_get("/now", extra="X-Forwarded-For: 10.0.0.1\r\n"))
        assert (await _read_answer(reader))[::2] == (200, {"now": True})
    finally:
        writer.close()
    # passed on: offered once, at the connection; with a body: on the lane, in the request's
    # task; with a proxy header: in the app
    assert EchoFastPath.offered == ["now", "now", "now"]
    assert EchoFastPath.tasks == [False, True, True]
    assert CountedClock.calls == 2  # the one passed on, the one with a proxy header


async def test_a_request_answered_at_once_whose_server_fails_gets_500_and_the_error_is_logged(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await _connect(port)
    try:
        writer.write(_get("/now?n=fail"))
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
        async with asyncio.timeout(5):
            rest = await reader.read()  # then closed by the server
    finally:
        writer.close()
    assert head.startswith("http/1.1 500")
    assert "connection: close" in head
    assert rest == b"Internal Server Error"
    assert "the server's own error" in caplog.text


async def test_a_request_read_with_one_answered_at_once_is_not_cut_by_the_keep_alive(
    http: type[asyncio.Protocol],
) -> None:
    global SLOW  # one per test: an event belongs to the loop it was first awaited in
    SLOW = asyncio.Event()
    async with serving_app(_app(), timeout_keep_alive=0.1, http=http) as (number, _config):
        reader, writer = await _connect(number)
        try:
            writer.write(_get("/now") + _get("/slow"))  # one read: the second is served next
            assert (await _read_answer(reader))[2] == {"now": True}
            # the slow request outlasts the keep-alive timeout several times over
            await asyncio.sleep(0.5)
            SLOW.set()
            async with asyncio.timeout(5):
                assert (await _read_answer(reader))[2] == {"slow": True}
        finally:
            writer.close()


async def test_a_request_answered_at_once_is_answered_when_the_server_s_headers_say_connection(
    http: type[asyncio.Protocol],
) -> None:
    # a default header the one-piece write leaves to uvicorn's cycle (and keeps the front off)
    options: dict[str, Any] = {"headers": [("Connection", "keep-alive")], "http": http}
    async with serving_app(_app(), **options) as (number, _config):
        reader, writer = await _connect(number)
        try:
            for _ in range(2):
                writer.write(_get("/now"))
                async with asyncio.timeout(5):
                    status, headers, body = await _read_answer(reader)
                assert (status, body) == (200, {"now": True})
                assert "x-tickle-time" in headers
        finally:
            writer.close()
