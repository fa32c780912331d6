"""Credentials the NS hands out: bearer tokens (stored only as their SHA-256) and tickle keys, and
who a token belongs to."""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a bearer token belongs to."""

    role: str  # task_server | computer
    name: str
    id: int


def token_sha256(token: str) -> str:
    """The stored form of a bearer token."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A new bearer token: 32 random bytes, url-safe base64."""
    return secrets.token_urlsafe(32)


def new_tickle_key() -> str:
    """A new tickle key: 32 random bytes, base64 (as registration answers carry it)."""
    return base64.b64encode(secrets.token_bytes(32)).decode()
