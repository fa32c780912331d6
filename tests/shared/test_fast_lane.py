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
from tickle.fastpath import FastPath, Parts, PassOn, Replay, json_response
from tickle.metrics import ComponentMetrics
from tickle.serving import BodyLimits, ClockHeaders, FastLane

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
    reading the body. `offered` records each request the fast path was offered."""

    offered: list[str] = []

    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app)
        self.served = {
            ("GET", "/ping"): (self._ping, frozenset()),
            ("POST", "/echo"): (self._echo, frozenset({"n"})),
        }

    async def _ping(self, parts: Parts, scope: Scope, receive: Replay, send: Send) -> None:
        EchoFastPath.offered.append("ping")
        await json_response('{"pong": true}', scope, receive, send)

    async def _echo(self, parts: Parts, scope: Scope, receive: Replay, send: Send) -> None:
        EchoFastPath.offered.append("echo")
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


@pytest.fixture
async def port() -> AsyncIterator[int]:
    async with serving_app(_app()) as (number, config):
        assert config.fast_lane is not None
        CountedClock.calls = 0
        EchoFastPath.offered.clear()
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
