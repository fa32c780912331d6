"""The NS API's request limits on a real NS: body sizes by credentials, heads, deadlines, the cap.

The figures of issue 11 (50 MB bodies, 1,100 half-sent requests, 10,000 headers) are played
against whole fleets in tests/attacks/test_api_limits.py; these pin down each rule, quickly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from tests.ns.conftest import SECRET, Ns, NsFactory, event

KIB = 1024


async def test_a_large_body_is_read_from_a_valid_token_only(ns: Ns) -> None:
    ts = await ns.task_server()
    # 10 events with 4,000-character output tails: past the 16 KiB of a request without a token
    batch = {"events": [event(1, "pc1", "started", 1.0, output_tail="x" * 4000)] * 10}

    status, _ = await ts.call("POST", "/api/ts/events", json=batch)
    assert status == 200
    status, body = await ns.call("POST", "/api/ts/events", token=None, json=batch)
    assert (status, body["detail"]) == (
        413,
        "request body over the 16384-byte limit without credentials",
    )
    status, body = await ns.call("POST", "/api/ts/events", token="not-a-token-0123456", json=batch)
    assert status == 401, body  # as the route answers: a task server registers again


async def test_a_registration_body_is_held_to_the_small_limit_whatever_the_token(ns: Ns) -> None:
    body = {"enrollment_secret": SECRET, "name": "ts1", "api_url": "x" * (17 * KIB)}
    status, answer = await ns.call("POST", "/api/ts/register", json=body)  # the admin token
    assert (status, answer["detail"]) == (
        413,
        "request body over the 16384-byte limit of registrations",
    )


async def test_an_operator_run_now_larger_than_the_small_limit_is_read(ns: Ns) -> None:
    task = await ns.ok("POST", "/api/tasks", json={"name": "t", "command": ["true"]})
    computers = [f"computer-{i:05d}" for i in range(2000)]  # about 32 KB
    status, body = await ns.call(
        "POST", "/api/runs", json={"task_id": task["id"], "computers": computers}
    )
    assert status == 404  # read and judged: none of them is registered
    assert body["detail"].startswith("unknown computer(s): computer-00000,")


async def test_a_body_over_max_body_bytes_is_refused_even_with_a_valid_token(
    ns_factory: NsFactory,
) -> None:
    ns = await ns_factory(max_body_bytes=64 * KIB)
    computers = [f"computer-{i:05d}" for i in range(5000)]  # about 80 KB
    status, body = await ns.call("POST", "/api/runs", json={"task_id": 1, "computers": computers})
    assert (status, body["detail"]) == (413, "request body over the 65536-byte limit")


async def test_a_streamed_body_is_stopped_at_its_limit(ns: Ns) -> None:
    sent = 0

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: sent chunked
        nonlocal sent
        for _ in range(1000):
            sent += 4 * KIB
            yield b"x" * (4 * KIB)

    async with ns.http.post(ns.url + "/api/ts/register", data=chunks()) as resp:
        assert resp.status == 413
        assert (await resp.json())["detail"].startswith("request body over the 16384-byte limit")
    assert sent < 1000 * 4 * KIB  # not read to the end


@pytest.mark.parametrize(
    ("headers", "status"),
    [(90, 200), (101, 431)],  # max_headers 100 (Host is one)
)
async def test_headers_past_max_headers_are_refused_431(ns: Ns, headers: int, status: int) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: ns\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(headers - 1)
    )
    answer, _ = await exchange(ns, request + b"\r\n")
    assert answer == status


@pytest.mark.parametrize(("size", "status"), [(15 * KIB, 200), (17 * KIB, 431)])
async def test_a_head_past_max_header_bytes_is_refused_431(ns: Ns, size: int, status: int) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: ns\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    answer, _ = await exchange(ns, request)
    assert answer == status


@pytest.mark.parametrize(
    ("deadline", "partial"),
    [
        ("request_head_timeout_s", b""),  # nothing sent
        ("request_head_timeout_s", b"GET /health HTTP/1.1\r\nHost: n"),
        ("request_body_timeout_s", b"POST /api/ts/register HTTP/1.1\r\nContent-Length: 9\r\n\r\n{"),
    ],
)
async def test_a_half_sent_request_gets_408_and_is_closed_at_its_deadline(
    ns_factory: NsFactory, deadline: str, partial: bytes
) -> None:
    ns = await ns_factory(**{deadline: 0.5})
    answer, seconds = await exchange(ns, partial)
    assert answer == 408
    assert 0.4 < seconds < 2.5


async def test_the_head_deadline_starts_at_a_requests_first_byte_not_the_last_answer(
    ns_factory: NsFactory,
) -> None:
    ns = await ns_factory(request_head_timeout_s=0.5)
    reader, writer = await _connect(ns)
    try:
        for _ in range(2):  # a kept-alive connection, idle longer than the head deadline
            writer.write(b"GET /health HTTP/1.1\r\nHost: ns\r\n\r\n")
            assert (await reader.readline()).split()[1] == b"200"
            await reader.readuntil(b"}")  # the body, {"status": ...}
            await asyncio.sleep(1.0)
    finally:
        writer.close()


async def test_at_the_cap_the_connection_waiting_longest_is_closed_for_a_new_one(
    ns_factory: NsFactory,
) -> None:
    ns = await ns_factory(max_connections=16)
    idle = [await _connect(ns) for _ in range(20)]
    for _, writer in idle:
        writer.write(b"GET /health HTTP/1.1\r\n")  # half a head, and no more
    try:
        status, _ = await ns.call("GET", "/health", token=None)
        assert status == 200
        # the oldest five made room for the others and the health check
        closed = await asyncio.gather(*(_closed_within(reader, 0.5) for reader, _ in idle))
        assert closed[:5] == [True] * 5
        assert not any(closed[6:]), closed
    finally:
        for _, writer in idle:
            writer.close()
    evicted = ns.metrics.registry.get_sample_value(
        "tickle_http_refused_total", {"reason": "evicted"}
    )
    assert evicted is not None
    assert evicted >= 5


# --- helpers ------------------------------------------------------------------------------------


async def _connect(ns: Ns) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(ns.url)
    assert url.hostname is not None
    return await asyncio.open_connection(url.hostname, url.port)


async def exchange(ns: Ns, request: bytes) -> tuple[int | None, float]:
    """Send `request` on a new connection; the answer's status (None: closed without one) and
    the seconds until the answer came or the connection closed."""
    reader, writer = await _connect(ns)
    started = time.monotonic()
    try:
        writer.write(request)
        line = await asyncio.wait_for(reader.readline(), 10)
    except ConnectionError:
        line = b""
    finally:
        writer.close()
    return (int(line.split()[1]) if line else None), time.monotonic() - started


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), seconds) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def test_a_large_batch_looks_its_task_server_token_up_once(
    ns: Ns, monkeypatch: pytest.MonkeyPatch
) -> None:
    ts = await ns.task_server()
    batch = {"events": [event(1, "pc1", "started", 1.0, output_tail="x" * 4000)] * 10}
    lookups: list[str] = []
    lookup = ns.stores.inventory.caller_for

    def counted(sha: str) -> object:
        lookups.append(sha)
        return lookup(sha)

    monkeypatch.setattr(ns.stores.inventory, "caller_for", counted)
    status, _ = await ts.call("POST", "/api/ts/events", json=batch)
    assert status == 200
    # the body limit's check found the task server: the route's credentials reuse it
    assert len(lookups) == 1, lookups


async def test_a_task_servers_token_is_looked_up_once_and_refused_at_once_when_it_ends(
    ns: Ns, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The NS keeps the task servers' tokens it looked up (a database query per request was 7 %
    of the event ingest); a rotated or deleted token is refused from the next request on."""
    ts = await ns.task_server()
    assert (await ts.call("GET", "/api/ts/settings"))[0] == 200  # looked up, and kept

    class Unreachable:
        def reading(self) -> None:
            raise AssertionError("the token was looked up in the database again")

    monkeypatch.setattr(ns.stores.inventory, "_db", Unreachable())
    for _ in range(3):
        assert (await ts.call("GET", "/api/ts/settings"))[0] == 200
    monkeypatch.undo()

    old = ts.token
    await ts.register()  # re-registering rotates the token
    status, _ = await ns.call("GET", "/api/ts/settings", token=old)
    assert status == 401
    assert (await ts.call("GET", "/api/ts/settings"))[0] == 200
    await ns.ok("DELETE", "/api/task-servers/ts1?force=true")
    status, _ = await ts.call("GET", "/api/ts/settings")
    assert status == 401


async def test_an_event_batch_any_json_parser_refuses_is_answered_as_before(ns: Ns) -> None:
    """Event batches are read by pydantic-core's JSON parser (faster); what it will not read goes
    to the standard library's, so a bad body is answered as FastAPI always did."""
    ts = await ns.task_server()
    headers = {"Authorization": f"Bearer {ts.token}", "Content-Type": "application/json"}
    url = ns.url + "/api/ts/events"
    async with ns.http.post(url, data=b'{"events": [', headers=headers) as resp:  # cut short
        assert resp.status == 422
        (error,) = (await resp.json())["detail"]
    assert (error["type"], error["loc"]) == ("json_invalid", ["body", 12])
