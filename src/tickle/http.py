"""HTTP client helpers of the task server and the operator commands (aiohttp).

The agent has its own, lighter client (`tickle.agent.h11http`); both raise `ApiError`.
"""

from __future__ import annotations

import functools
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel, TypeAdapter

from tickle.clock import TIME_HEADER, Clock, header_value, parse_header
from tickle.httpbase import CLIENT_KEEPALIVE_S, ApiError, api_error, retry_after_s

M = TypeVar("M")

__all__ = [
    "CLIENT_KEEPALIVE_S",
    "ApiError",
    "client_session",
    "clock_trace",
    "request",
    "retry_after_s",
]


def clock_trace(
    clock: Clock = time.time, on_offset: Callable[[float], None] | None = None
) -> aiohttp.TraceConfig:
    """Each request carries our time (`X-Tickle-Time`), so the server can measure our clock.

    Each answer carrying the server's time gives `on_offset` one sample of the server's offset
    from us: its time minus the midpoint of the round trip (positive: its clock is ahead).
    """
    trace = aiohttp.TraceConfig()

    async def started(
        _: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestStartParams
    ) -> None:
        ctx.sent_at = clock()
        params.headers[TIME_HEADER] = header_value(ctx.sent_at)

    async def answered(
        _: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        if on_offset is None:
            return
        now = clock()
        theirs = parse_header(params.response.headers.get(TIME_HEADER), now)
        if theirs is not None:
            on_offset(theirs - (ctx.sent_at + now) / 2)

    trace.on_request_start.append(started)
    trace.on_request_end.append(answered)
    return trace


def client_session(
    token: str | None = None,
    timeout_s: float = 10.0,
    ca_file: Path | None = None,
    limit: int = 100,
    on_offset: Callable[[float], None] | None = None,
) -> aiohttp.ClientSession:
    """An aiohttp session with bearer auth, a total timeout and (optionally) a private CA.

    Its requests carry our time (`clock_trace`), so the server sees how far our clock is off;
    `on_offset` gets a sample of the server's offset from each answer.
    """
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ssl_ctx: ssl.SSLContext | bool = True
    if ca_file is not None:
        ssl_ctx = ssl.create_default_context(cafile=str(ca_file))
    connector = aiohttp.TCPConnector(limit=limit, ssl=ssl_ctx, keepalive_timeout=CLIENT_KEEPALIVE_S)
    return aiohttp.ClientSession(
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        connector=connector,
        trace_configs=[clock_trace(on_offset=on_offset)],
    )


async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    body: BaseModel | list[BaseModel] | bytes | None = None,
    params: dict[str, str] | None = None,
    answer: type[M] | Any = None,
    token: str | None = None,
    idempotent: bool = False,
    time_limit: aiohttp.ClientTimeout | None = None,
) -> M | Any:
    """Send a request with a pydantic body (or JSON already serialized: bytes); parse the
    answer into `answer` (a type) if given.

    `idempotent`: a request the server may get twice; sent once more, on a new connection, when
    the server closed the connection without answering (a kept-alive one it was closing). An
    answer without content (204) is None. `time_limit`: this request's, instead of the session's.
    """
    data: bytes | None = None
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if isinstance(body, bytes):
        data = body
    elif isinstance(body, BaseModel):
        data = body.model_dump_json().encode()
    elif body is not None:
        data = b"[" + b",".join(m.model_dump_json().encode() for m in body) + b"]"
    try:
        raw, status = await _send(session, method, url, data, params, headers, time_limit)
    except aiohttp.ServerDisconnectedError:
        if not idempotent:
            raise
        raw, status = await _send(session, method, url, data, params, headers, time_limit)
    if answer is None or status == 204:
        return None
    return _adapter(answer).validate_json(raw)


def _adapter(answer: Any) -> TypeAdapter[Any]:
    """The validator of answers of type `answer`, built once per type: building it for each
    answer cost a request a fifth more CPU, for a union of types over half as much again."""
    try:
        return _cached_adapter(answer)
    except TypeError:  # a type that cannot be a dictionary key
        return TypeAdapter(answer)


@functools.lru_cache(maxsize=256)
def _cached_adapter(answer: Any) -> TypeAdapter[Any]:
    return TypeAdapter(answer)


async def _send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    data: bytes | None,
    params: dict[str, str] | None,
    headers: dict[str, str],
    time_limit: aiohttp.ClientTimeout | None = None,
) -> tuple[bytes, int]:
    """The answer's body and status; ApiError for a status of 400 or more."""
    extra: dict[str, Any] = {} if time_limit is None else {"timeout": time_limit}
    async with session.request(
        method, url, data=data, params=params, headers=headers, **extra
    ) as resp:
        raw = await resp.read()
        if resp.status >= 400:
            raise api_error(resp.status, raw, url, resp.headers.get("Retry-After"))
    return raw, resp.status
