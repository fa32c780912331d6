"""The task server's API socket answers without Nagle delays."""

from __future__ import annotations

import asyncio
import socket

from tickle.taskserver.service import _bind_tcp


async def test_connections_to_the_api_socket_have_tcp_nodelay() -> None:
    # without TCP_NODELAY a response's body waited ~40 ms for the delayed ACK of its headers
    sock = _bind_tcp("127.0.0.1", 0)
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = writer.get_extra_info("socket")
        seen.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(accepted, sock=sock)
    try:
        _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        assert await asyncio.wait_for(seen, 5) == 1
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
