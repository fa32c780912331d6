"""What the task server's agent-facing services raise when they will not do what an agent asked."""

from __future__ import annotations

from starlette.responses import JSONResponse

from tickle.serving import RETRY_AFTER_S


class Refused(Exception):
    """The agent's request is refused; the API answers `status` with `detail`. A 503 (too busy,
    the NS unreachable) says when to try again: Retry-After, `retry_after_s` (default
    `tickle.serving.RETRY_AFTER_S`); the agent waits at least that long, with jitter."""

    def __init__(self, status: int, detail: str, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        if retry_after_s is None and status == 503:
            retry_after_s = RETRY_AFTER_S
        self.retry_after_s = retry_after_s


def refusal_response(exc: Refused) -> JSONResponse:
    """The answer to a refused request: its detail, and when to try again (Retry-After)."""
    retry = {} if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=retry)
