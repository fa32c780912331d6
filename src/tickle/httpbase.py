"""What every HTTP client of Tickle shares, with no HTTP library: the error of an answer other than
2xx (with the server's explanation and `Retry-After`), and how long an idle connection is kept.

The servers' and the operator's clients (`tickle.http`, aiohttp) and the agent's
(`tickle.agent.h11http`, h11) build their errors here, so the agent need not load aiohttp.
"""

from __future__ import annotations

import json
from typing import Any

# how long a client keeps an idle connection for reuse: shorter than the servers' keep-alive
# (`tickle.serving.SERVER_KEEPALIVE_S`), so a client never sends on a connection the server is
# closing at that moment ("Server disconnected")
CLIENT_KEEPALIVE_S = 10.0


class ApiError(Exception):
    """An HTTP answer other than 2xx; `detail` is the server's explanation."""

    def __init__(
        self,
        status: int,
        detail: str,
        url: str,
        retry_after_s: float | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(f"HTTP {status} from {url}: {detail}")
        self.status = status
        self.detail = detail
        self.url = url
        self.retry_after_s = retry_after_s  # the server's Retry-After (seconds), if it said
        self.errors = errors or []  # a 422's field errors: loc, msg, type, ctx


def retry_after_s(exc: BaseException) -> float:
    """How long the server asked the client to wait before trying again (0: it did not say)."""
    return (exc.retry_after_s or 0.0) if isinstance(exc, ApiError) else 0.0


def api_error(status: int, raw: bytes, url: str, retry_after: str | None) -> ApiError:
    """The error of an answer of `status` (400 or more) with body `raw` and that `Retry-After`."""
    wait = retry_after or ""
    return ApiError(
        status, _detail(raw), url, float(wait) if wait.isdigit() else None, _field_errors(raw)
    )


def _field_errors(raw: bytes) -> list[dict[str, Any]]:
    """The field errors of a 422 answer (FastAPI's `detail` list); [] for any other answer."""
    try:
        detail = json.loads(raw).get("detail")
    except (ValueError, AttributeError):
        return []
    if isinstance(detail, list) and all(isinstance(e, dict) and "msg" in e for e in detail):
        return detail
    return []


def _detail(raw: bytes) -> str:
    try:
        parsed = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")[:500]
    if isinstance(parsed, dict) and "detail" in parsed:
        return str(parsed["detail"])[:2000]
    return str(parsed)[:500]
