"""What the task server's agent-facing services raise when they will not do what an agent asked."""

from __future__ import annotations


class Refused(Exception):
    """The agent's request is refused; the API answers `status` with `detail`."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
