"""Kept-alive connections: the clients let an idle connection go before the servers close it, and
an idempotent call that meets a connection the server closed anyway is sent once more."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette

from tickle.agent.settings import AgentSettings
from tickle.agent.state import AgentState
from tickle.agent.ts_client import TaskServerClient
from tickle.config import ApiServerSettings
from tickle.http import client_session
from tickle.messages import EventBatch, StatusEvent
from tickle.metrics import ComponentMetrics
from tickle.serving import ServingConfig
from tickle.taskserver.ns_client import NsClient


def _server_keepalive() -> float:
    config = ServingConfig(Starlette(), ApiServerSettings(), ComponentMetrics("t"))
    return float(config.timeout_keep_alive)


async def test_the_clients_close_idle_connections_before_the_servers_do(tmp_path: object) -> None:
    server = _server_keepalive()
    async with client_session() as session:
        connector = session.connector
        assert connector is not None
        assert connector._keepalive_timeout < server  # type: ignore[attr-defined]
    settings = AgentSettings(name="pc1", task_servers=["http://127.0.0.1:1"],
                             state_dir=tmp_path, enrollment_secret="s")  # type: ignore[arg-type]  # fmt: skip
    state = AgentState(settings.state_dir / "state.db")
    agent = TaskServerClient(settings, state)
    await agent.start()
    try:
        assert agent._http_client is not None
        assert agent._http_client._keepalive_s < server
    finally:
        await agent.close()
        state.close()


class ClosesReusedConnections:
    """An HTTP server that answers the first request of a connection and closes the connection
    when a second one arrives on it: what a client meets that sends on a kept-alive connection
    just as the server's keep-alive timeout closes it."""

    def __init__(self) -> None:
        self.answered = 0
        self.dropped = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode().split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                body = await reader.readexactly(length)
                if not first:
                    self.dropped += 1
                    return
                first = False
                self.answered += 1
                ids = [e.event_id for e in EventBatch.model_validate_json(body).events]
                answer = ('{"accepted": [' + ",".join(f'"{i}"' for i in ids) + "]}").encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(answer)}\r\n\r\n".encode()
                    + answer
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@pytest.fixture
async def closing_server() -> AsyncIterator[tuple[ClosesReusedConnections, str]]:
    handler = ClosesReusedConnections()
    server = await asyncio.start_server(handler.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield handler, f"http://127.0.0.1:{port}"
    server.close()
    await server.wait_closed()


async def test_an_event_batch_sent_on_a_connection_the_ns_closed_is_sent_again(
    closing_server: tuple[ClosesReusedConnections, str],
) -> None:
    handler, url = closing_server
    client = NsClient(url)
    try:
        for i in range(2):
            event = StatusEvent(event_id=str(uuid.uuid4()), execution_id=i + 1,
                                computer="pc1", kind="started", at=1.0)  # fmt: skip
            accepted = await client.send_events([event.model_dump_json()])
            assert accepted == [event.event_id]
    finally:
        await client.close()
    assert (handler.answered, handler.dropped) == (2, 1)
