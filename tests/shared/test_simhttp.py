"""The simulated agents' own HTTP client (tickle.testing.simhttp) and what a simulated agent does
with its answers: the requests a real agent sends, keep-alive, Retry-After, refusals, bad answers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from tickle import serving
from tickle.agentapi import EventAck, EventBatch, StatusEvent
from tickle.backoff import Backoff
from tickle.httpbase import ApiError
from tickle.testing import simagents
from tickle.testing.simagents import SimAgent
from tickle.testing.simhttp import ProtocolError, SimHttp

WITHIN_S = 10.0


@dataclass
class Request:
    head: list[str]  # the request line, then the header lines
    body: bytes
    at: float
    connection: int

    def header(self, name: str) -> str | None:
        for line in self.head[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


# an answer: the bytes to send back, and whether to close the connection after them
Answer = tuple[bytes, bool]


def answer(status: str, body: bytes = b"", extra: str = "") -> Answer:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body, False


@dataclass
class ScriptedServer:
    """Answers each request it reads with the next answer of `script` (`None` there: close the
    connection without answering), recording the requests and the connections."""

    script: list[Answer | None] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    connections: int = 0
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    self.closed_by_client.set()
                    return
                head = raw.decode("latin-1").split("\r\n")[:-2]
                request = Request(head, b"", time.monotonic(), number)
                length = int(request.header("content-length") or 0)
                request.body = await reader.readexactly(length)
                self.requests.append(request)
                step = self.script.pop(0)
                if step is None:
                    return
                data, close = step
                writer.write(data)
                await writer.drain()
                if close:
                    return
        except ConnectionError:
            return
        finally:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[ScriptedServer]:
    scripted = ScriptedServer()
    srv = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
    scripted.url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    yield scripted
    srv.close()


def _agent(server: ScriptedServer) -> SimAgent:
    agent = SimAgent("sim-00001", "127.0.0.1", server.url, Counter(), tickle_port=50124)
    agent.http = SimHttp(server.url, "127.0.0.1", timeout_s=WITHIN_S)
    agent.auth = b"Authorization: Bearer tok-1\r\n"
    return agent


def _batch() -> EventBatch:
    return EventBatch(events=[StatusEvent(event_id="ev-0000001", execution_id=7,
                                          computer="sim-00001", kind="started", at=1.5)])  # fmt: skip


ACK = b'{"accepted": ["ev-0000001"]}'
QUICK = Backoff(base_s=0.01, max_s=0.05, tries=None, full_jitter=True)


async def test_the_request_carries_the_agents_headers_and_its_body_as_the_server_reads_it(
    server: ScriptedServer,
) -> None:
    server.script = [answer("200 OK", ACK)]
    agent = _agent(server)
    before = time.time()
    ack = await agent.call("POST", "/api/agent/events", _batch(), EventAck, agent.auth, None)
    await agent.close()
    assert ack.accepted == ["ev-0000001"]
    (request,) = server.requests
    assert request.head[0] == "POST /api/agent/events HTTP/1.1"
    assert request.header("authorization") == "Bearer tok-1"
    assert request.header("content-type") == "application/json"
    assert request.header("host") == server.url.removeprefix("http://")
    assert before - 1 <= float(request.header("x-tickle-time") or 0) <= time.time() + 1
    body = json.loads(request.body)
    assert body["events"][0]["event_id"] == "ev-0000001"
    assert body["events"][0]["exit_code"] is None  # every field, as the pydantic models wrote


async def test_a_503_with_retry_after_is_tried_again_after_that_delay(
    server: ScriptedServer,
) -> None:
    server.script = [answer("503 Service Unavailable", b'{"detail": "busy"}', "Retry-After: 1\r\n"),
                     answer("200 OK", ACK)]  # fmt: skip
    agent = _agent(server)
    ack = await agent.call("POST", "/api/agent/events", _batch(), EventAck, agent.auth, QUICK)
    await agent.close()
    assert ack.accepted == ["ev-0000001"]
    first, second = server.requests
    assert second.at - first.at >= 1.0  # never sooner than the server asked
    assert second.body == first.body
    assert second.connection == first.connection  # the 503 kept the connection alive
    assert sum(agent.sent.values()) == 2


async def test_a_body_the_server_refuses_is_reported_and_not_tried_again(
    server: ScriptedServer,
) -> None:
    server.script = [answer("422 Unprocessable Entity", b'{"detail": "bad event_id"}')]
    agent = _agent(server)
    with pytest.raises(ApiError, match="bad event_id") as refused:
        await agent.call("POST", "/api/agent/events", _batch(), EventAck, agent.auth, QUICK)
    await agent.close()
    assert refused.value.status == 422
    assert len(server.requests) == 1


async def test_a_kept_connection_is_reused_then_closed_when_idle(server: ScriptedServer) -> None:
    server.script = [answer("200 OK", ACK), answer("200 OK", ACK)]
    client = SimHttp(server.url, "127.0.0.1", keepalive_s=0.2)
    for _ in range(2):
        assert (await client.request("GET", "/x")).body == ACK
    assert server.connections == 1
    # the client lets the idle connection go (before the server's keep-alive would)
    await asyncio.wait_for(server.closed_by_client.wait(), WITHIN_S)
    await client.close()


async def test_a_connection_the_server_closed_is_opened_again(server: ScriptedServer) -> None:
    server.script = [(answer("200 OK", ACK)[0], True), answer("200 OK", ACK)]
    client = SimHttp(server.url, "127.0.0.1")
    assert (await client.request("POST", "/x", body=b"{}")).status == 200
    async with asyncio.timeout(WITHIN_S):  # the client sees the server's close
        while not all(c.closed for c in client._idle):
            await asyncio.sleep(0.01)
    assert (await client.request("POST", "/x", body=b"{}")).status == 200
    assert server.connections == 2
    await client.close()


async def test_a_get_meeting_a_kept_connection_closed_unanswered_is_sent_once_more(
    server: ScriptedServer,
) -> None:
    server.script = [answer("200 OK", ACK), None, answer("200 OK", ACK)]
    client = SimHttp(server.url, "127.0.0.1")
    assert (await client.request("GET", "/x")).status == 200
    assert (await client.request("GET", "/x")).body == ACK
    assert [r.connection for r in server.requests] == [1, 1, 2]
    await client.close()


async def test_a_get_taking_a_kept_connection_already_closing_is_sent_on_a_new_one(
    server: ScriptedServer,
) -> None:
    # the server closed the idle connection and the client's transport is closing, its loss
    # not yet told: the request is never written there, and that connection's earlier answer
    # must not count as one to this request (it was raised, not sent again: issue 10's crowded
    # task server, which closes connections idle 0.1 s, had agents' pulls fail and tickles resent)
    server.script = [answer("200 OK", ACK), answer("200 OK", ACK)]
    client = SimHttp(server.url, "127.0.0.1")
    assert (await client.request("GET", "/x")).status == 200
    (kept,) = client._idle
    assert kept.transport is not None
    kept.transport.close()  # closing now; `connection_lost` comes at a later turn
    assert not kept.closed
    assert (await client.request("GET", "/x")).body == ACK
    assert [r.connection for r in server.requests] == [1, 2]
    await client.close()


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{}", "closed the connection"),
        (b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", "not an HTTP answer"),
        (b"HTTP/1.1 200 OK\r\n\r\n{}", "without Content-Length"),
    ],
)
async def test_an_answer_that_is_not_whole_http_is_a_protocol_error(
    server: ScriptedServer, reply: bytes, error: str
) -> None:
    server.script = [(reply, True)]
    client = SimHttp(server.url, "127.0.0.1")
    with pytest.raises(ProtocolError, match=error):
        await client.request("POST", "/x", body=b"{}")
    await client.close()


async def test_a_chunked_answer_is_read_whole(server: ScriptedServer) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    server.script = [(chunked, False)]
    client = SimHttp(server.url, "127.0.0.1")
    response = await client.request("POST", "/x", body=b"{}")
    assert (response.status, response.body) == (200, b"{}")
    await client.close()


async def test_a_server_that_never_answers_times_out(server: ScriptedServer) -> None:
    hold = asyncio.Event()

    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await hold.wait()
        writer.close()

    srv = await asyncio.start_server(never, "127.0.0.1", 0)
    client = SimHttp(f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}", "127.0.0.1")
    with pytest.raises(TimeoutError):
        await client.request("GET", "/x", timeout_s=0.2)
    hold.set()
    await client.close()
    srv.close()


def test_only_plain_http_urls() -> None:
    bad: Callable[[], object] = lambda: SimHttp("https://127.0.0.1:1")  # noqa: E731
    with pytest.raises(ValueError, match="plain-HTTP"):
        bad()


def test_a_simulator_process_imports_no_server_stack() -> None:
    """A simulator process starts without fastapi, aiohttp or pydantic: they cost it 1.3 CPU-s,
    which the servers' registrations waited behind (a process per 250 agents)."""
    code = ("import sys, tickle.testing.simagents\n"
            "print(sorted({'fastapi', 'aiohttp', 'pydantic', 'uvicorn'} & set(sys.modules)))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_simulators_collector_thresholds_are_the_servers() -> None:
    assert simagents.GC_THRESHOLD == serving.GC_THRESHOLD
