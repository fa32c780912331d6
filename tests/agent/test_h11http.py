"""The agent's own HTTP/1.1 (h11 over asyncio streams): its client against a real HTTP server
(aiohttp's), over TLS with the CA checked, and the control socket's server against real clients."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from tests.agent.conftest import eventually
from tests.reliability import record
from tickle.agent.h11http import Answer, HttpClient, HttpServer, ProtocolError, json_answer
from tickle.clock import TIME_HEADER
from tickle.testing.devca import DevCa


class Peer:
    """A real HTTP server (aiohttp) that notes each request's connection and headers."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        self.headers: list[dict[str, str]] = []
        self.bodies: list[bytes] = []
        self.clock_ahead_s = 0.0
        self.never = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/echo", self.echo)
        app.router.add_get("/busy", self.busy)
        app.router.add_get("/hang", self.hang)
        return app

    async def echo(self, request: web.Request) -> web.Response:
        self.peers.append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        self.headers.append(dict(request.headers))
        self.bodies.append(await request.read())
        return web.json_response(
            {"query": dict(request.query)},
            headers={TIME_HEADER: f"{time.time() + self.clock_ahead_s:.3f}"},
        )

    async def busy(self, request: web.Request) -> web.Response:
        return web.json_response({"detail": "busy"}, status=503, headers={"Retry-After": "7"})

    async def hang(self, request: web.Request) -> web.Response:
        await self.never.wait()
        return web.Response()


async def _serve(app: web.Application, ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context).start()
    return runner


def _url(runner: web.AppRunner, scheme: str = "http") -> str:
    port = runner.addresses[0][1]
    return f"{scheme}://127.0.0.1:{port}"


@pytest.fixture
async def peer() -> AsyncIterator[tuple[Peer, str]]:
    peer = Peer()
    runner = await _serve(peer.app())
    yield peer, _url(runner)
    await runner.cleanup()


async def test_requests_share_one_kept_alive_connection(peer: tuple[Peer, str]) -> None:
    server, url = peer
    client = HttpClient()
    try:
        for i in range(3):
            resp = await client.request(
                "POST", f"{url}/echo?a=1", body=b'{"n": %d}' % i, params={"b": "2"},
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            assert resp.status == 200
            assert resp.body == b'{"query": {"a": "1", "b": "2"}}'
    finally:
        await client.close()
    assert len(set(server.peers)) == 1
    assert server.bodies == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']


async def test_requests_carry_our_time_and_answers_measure_the_servers_clock(
    peer: tuple[Peer, str],
) -> None:
    server, url = peer
    server.clock_ahead_s = 100.0
    samples: list[float] = []
    client = HttpClient(on_offset=samples.append)
    try:
        await client.request("GET", f"{url}/echo")
    finally:
        await client.close()
    sent = float(server.headers[0][TIME_HEADER])
    assert abs(sent - time.time()) < 60
    assert len(samples) == 1
    assert 90 < samples[0] < 110


async def test_an_error_answer_is_returned_with_its_retry_after(peer: tuple[Peer, str]) -> None:
    _, url = peer
    client = HttpClient()
    try:
        resp = await client.request("GET", f"{url}/busy")
    finally:
        await client.close()
    assert (resp.status, resp.headers["retry-after"]) == (503, "7")


async def test_a_request_past_its_time_limit_fails_and_its_connection_is_dropped(
    peer: tuple[Peer, str],
) -> None:
    server, url = peer
    client = HttpClient(timeout_s=30.0)
    try:
        with pytest.raises(TimeoutError):
            await client.request("GET", f"{url}/hang", timeout_s=0.3)
        assert not any(client._idle.values())
        assert (await client.request("GET", f"{url}/echo")).status == 200
    finally:
        server.never.set()
        await client.close()


@contextlib.asynccontextmanager
async def _raw_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[tuple[HttpClient, str]]:
    """A server on loopback answering each connection with `handler` (bytes of our own, not
    necessarily HTTP), and a client: the client and the server's URL."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    client = HttpClient()
    try:
        yield client, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    connections = 0

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        # no "Connection: close": the client may keep it, and must notice the close
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    async with _raw_server(answer_once) as (client, url):
        assert (await client.request("GET", url)).body == b"ok"
        idle = [c for conns in client._idle.values() for c in conns]
        await eventually(lambda: all(c.reader.at_eof() for c in idle), what="the server's close")
        assert (await client.request("GET", url)).body == b"ok"
    assert connections == 2


async def test_an_answer_that_is_not_http_is_a_connection_error() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        await writer.drain()
        writer.close()

    async with _raw_server(garbage) as (client, url):
        with pytest.raises(ProtocolError) as caught:
            await client.request("GET", url)
        assert isinstance(caught.value, OSError)  # the agent counts it as no answer


async def test_tls_checks_the_servers_certificate_against_the_ca(tmp_path: Path) -> None:
    ca = DevCa(tmp_path / "ca")
    cert = ca.issue("ts1", ["127.0.0.1"])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert.cert_file, cert.key_file)
    peer = Peer()
    runner = await _serve(peer.app(), server_ctx)
    url = _url(runner, "https")
    trusting = HttpClient(ssl_context=ssl.create_default_context(cafile=str(ca.ca_file)))
    stranger = HttpClient(ssl_context=ssl.create_default_context())
    try:
        assert (await trusting.request("GET", f"{url}/echo")).status == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            await stranger.request("GET", f"{url}/echo")
    finally:
        await trusting.close()
        await stranger.close()
        await runner.cleanup()
    assert len(peer.peers) == 1


# --- the control socket's server ----------------------------------------------------------------


@pytest.fixture
async def control(short_dir: Path) -> AsyncIterator[tuple[str, list[str]]]:
    calls: list[str] = []

    async def status() -> Answer:
        calls.append("status")
        return json_answer({"ok": True})

    async def broken() -> Answer:
        raise RuntimeError("a bug")

    server = HttpServer({("GET", "/status"): status, ("POST", "/broken"): broken}, idle_s=0.5)
    path = str(short_dir / "c.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    await server.serve_socket(sock)
    yield path, calls
    await server.close()


async def _raw(path: str, data: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10.0)
    finally:
        writer.close()


async def test_the_control_server_answers_its_routes_on_one_kept_alive_connection(
    control: tuple[str, list[str]],
) -> None:
    path, calls = control
    client = HttpClient(unix_path=path)
    try:
        answers = [await client.request("GET", "http://agent/status") for _ in range(2)]
        missing = await client.request("GET", "http://agent/nothing")
        wrong = await client.request("POST", "http://agent/status")
        failing = await client.request("POST", "http://agent/broken")
        connections = sum(len(c) for c in client._idle.values())
    finally:
        await client.close()
    assert [(a.status, a.body) for a in answers] == [(200, b'{"ok": true}')] * 2
    assert answers[0].headers["content-type"] == "application/json; charset=utf-8"
    assert (missing.status, wrong.status, failing.status) == (404, 405, 500)
    assert calls == ["status", "status"]
    assert connections == 1


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /status HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"x" * 20000 + b"\r\n\r\n", b"431"),
        (b"POST /status HTTP/1.1\r\nHost: a\r\nContent-Length: 40000\r\n\r\n" + b"x" * 40000,
         b"413"),
        (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
    ],
    ids=["head-too-large", "body-too-large", "not-http"],
)  # fmt: skip
@pytest.mark.attacks
async def test_the_control_server_refuses_oversized_or_malformed_requests(
    control: tuple[str, list[str]], request_bytes: bytes, status: bytes
) -> None:
    path, calls = control
    answer = await _raw(path, request_bytes)
    assert answer.split(b" ")[1] == status, answer
    assert calls == []
    what = {b"431": "a 20 KB head", b"413": "a 40 KB body", b"400": "bytes that are not HTTP"}
    record(
        case=f"Agent control/metrics server: {what[status]}",
        done=f"one request of {what[status]} to the agent's control server",
        outcome=f"refused with HTTP {status.decode()} before any handler, connection closed",
        tried=1,
    )


async def test_the_control_server_closes_a_connection_that_sends_nothing(
    control: tuple[str, list[str]],
) -> None:
    path, _ = control
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        # idle_s is 0.5 s: the server closes well before this bound
        assert await asyncio.wait_for(reader.read(), 10.0) == b""
    finally:
        writer.close()


def _closes_second_request() -> tuple[
    Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], list[int]
]:
    """A handler answering a connection's first request (kept alive) and closing it, with no
    answer, when a second one comes: a server that dropped an idle kept-alive connection just as
    the client took it again. The list counts the connections."""
    connections: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(len(connections))
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
        writer.close()

    return handler, connections


async def test_an_idempotent_request_on_a_connection_closed_unanswered_goes_again_on_a_new_one() -> (
    None
):
    # a crowded task server closes connections idle 0.1 s: one the agent just took for its pull
    handler, connections = _closes_second_request()
    async with _raw_server(handler) as (client, url):
        assert (await client.request("GET", url)).body == b"ok"
        assert (await client.request("GET", url)).body == b"ok"
    assert len(connections) == 2


async def test_a_post_on_a_connection_closed_unanswered_is_not_sent_again() -> None:
    handler, connections = _closes_second_request()
    async with _raw_server(handler) as (client, url):
        assert (await client.request("POST", url, body=b"{}")).body == b"ok"
        with pytest.raises(ProtocolError, match="closed the connection before answering"):
            await client.request("POST", url, body=b"{}")
    assert len(connections) == 1


async def test_a_new_connection_closed_unanswered_is_not_tried_again() -> None:
    connections = 0

    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    async with _raw_server(close_at_once) as (client, url):
        with pytest.raises(ProtocolError, match="closed the connection before answering"):
            await client.request("GET", url)
    assert connections == 1
