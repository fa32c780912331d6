"""What the stores and services refuse with; the API maps each to its HTTP status."""

from __future__ import annotations


class Unauthorized(Exception):
    """A missing or wrong secret (HTTP 401)."""


class NotFound(Exception):
    """An object named in a request does not exist (HTTP 404)."""


class Forbidden(Exception):
    """A valid credential touching something it may not (HTTP 403)."""


class Conflict(Exception):
    """The request clashes with what exists (HTTP 409)."""


# what each refusal answers
STATUS: dict[type[Exception], int] = {
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
}
