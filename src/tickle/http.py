"""HTTP client helpers shared by the task server, the agent and the operator commands (aiohttp)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel, TypeAdapter

M = TypeVar("M")

# how long a client keeps an idle connection for reuse: shorter than the servers' keep-alive
# (`tickle.serving.SERVER_KEEPALIVE_S`), so a client never sends on a connection the server is
# closing at that moment ("Server disconnected")
CLIENT_KEEPALIVE_S = 10.0


class ApiError(Exception):
    """An HTTP answer other than 2xx; `detail` is the server's explanation."""

    def __init__(
        self, status: int, detail: str, url: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"HTTP {status} from {url}: {detail}")
        self.status = status
        self.detail = detail
        self.url = url
        self.retry_after_s = retry_after_s  # the server's Retry-After (seconds), if it said


def retry_after_s(exc: BaseException) -> float:
    """How long the server asked the client to wait before trying again (0: it did not say)."""
    return (exc.retry_after_s or 0.0) if isinstance(exc, ApiError) else 0.0


def client_session(
    token: str | None = None,
    timeout_s: float = 10.0,
    ca_file: Path | None = None,
    limit: int = 100,
) -> aiohttp.ClientSession:
    """An aiohttp session with bearer auth, a total timeout and (optionally) a private CA."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ssl_ctx: ssl.SSLContext | bool = True
    if ca_file is not None:
        ssl_ctx = ssl.create_default_context(cafile=str(ca_file))
    connector = aiohttp.TCPConnector(limit=limit, ssl=ssl_ctx, keepalive_timeout=CLIENT_KEEPALIVE_S)
    return aiohttp.ClientSession(
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        connector=connector,
    )


async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    body: BaseModel | list[BaseModel] | None = None,
    params: dict[str, str] | None = None,
    answer: type[M] | Any = None,
    token: str | None = None,
    idempotent: bool = False,
) -> M | Any:
    """Send a request with a pydantic body; parse the answer into `answer` (a type) if given.

    `idempotent`: a request the server may get twice; sent once more, on a new connection, when
    the server closed the connection without answering (a kept-alive one it was closing).
    """
    data: bytes | None = None
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if isinstance(body, BaseModel):
        data = body.model_dump_json().encode()
    elif body is not None:
        data = b"[" + b",".join(m.model_dump_json().encode() for m in body) + b"]"
    try:
        raw = await _send(session, method, url, data, params, headers)
    except aiohttp.ServerDisconnectedError:
        if not idempotent:
            raise
        raw = await _send(session, method, url, data, params, headers)
    if answer is None:
        return None
    return TypeAdapter(answer).validate_json(raw)


async def _send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    data: bytes | None,
    params: dict[str, str] | None,
    headers: dict[str, str],
) -> bytes:
    async with session.request(method, url, data=data, params=params, headers=headers) as resp:
        raw = await resp.read()
        if resp.status >= 400:
            wait = resp.headers.get("Retry-After", "")
            raise ApiError(resp.status, _detail(raw), url, float(wait) if wait.isdigit() else None)
    return raw


def _detail(raw: bytes) -> str:
    import json

    try:
        parsed = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500]
    if isinstance(parsed, dict) and "detail" in parsed:
        return str(parsed["detail"])[:2000]
    return str(parsed)[:500]
