"""How `make bench` counts S6's NS-restart reconnection of the task servers (bench/run.py): its
relay notes what each task server tried while the NS was down and when the NS answered each of
those again, so the reconnection ends there, not at the run's end (the run's status events the
task servers forward afterwards are no part of it)."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

# bench/run.py: a script beside its longpoll.py, not a package
import run as bench


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


async def request(url_port: int, path: str) -> bytes:
    """One HTTP/1.1 request through the relay; its answer (b"" when the relay closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", url_port)
    writer.write(f"GET {path}?x=1 HTTP/1.1\r\nHost: ns\r\nContent-Length: 0\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(65536), 5.0)
    writer.close()
    return answer


async def test_a_task_server_is_served_again_once_the_ns_answers_what_it_tried_while_down() -> None:
    ns_port = free_port("127.0.0.1")
    relay = bench.RequestCounter("127.0.0.1", ("127.0.0.1", ns_port), free_port("127.0.0.1"))
    await relay.start()

    async def ns(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    try:
        killed_at = time.time()
        assert await request(relay.port, "/api/ts/work") == b""  # the NS is down: closed
        server = await asyncio.start_server(ns, "127.0.0.1", ns_port)
        back_at = time.time()
        async with server:
            assert (await request(relay.port, "/api/ts/events")).startswith(b"HTTP/1.1 200")
            # answered, but not what it tried while the NS was down: not served again yet
            assert relay.served_again_at(killed_at, back_at) is None
            assert (await request(relay.port, "/api/ts/work")).startswith(b"HTTP/1.1 200")
            served = relay.served_again_at(killed_at, back_at)
    finally:
        await relay.close()
    assert relay.tried(killed_at, back_at) == {"GET /api/ts/work"}
    assert served is not None
    assert back_at <= served <= time.time()
    assert sum(relay.per_tenth.values()) == 3


def test_requests_within_less_than_a_second_are_one_second_of_them() -> None:
    # 8 requests within 0.3 s: one second of 8, not a peak of 8 over a mean of 26.7 a second
    assert bench.reconnection_ratio(Counter({10: 5, 12: 3}), 0.5, 2.0) == 1.0
    # the whole seconds as before: 10, then 2 over the tenth the last came in
    assert bench.reconnection_ratio(Counter({10: 10, 30: 2}), 0.5, 4.0) == 10 / (12 / 2.1)


def test_a_peak_is_never_below_the_mean() -> None:
    # 4 requests, then 6 a second later within a tenth: seconds [4, 6] over 1.1 s, a mean of 9.1
    assert bench.reconnection_ratio(Counter({10: 4, 20: 6}), 0.5, 3.0) == 1.0
