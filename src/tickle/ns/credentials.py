"""Credentials the NS hands out: bearer tokens (stored only as their SHA-256) and tickle keys, and
who a token belongs to."""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
from dataclasses import dataclass

from cachetools import TTLCache

# how long a process trusts a task server's token it looked up: another NS process sharing the
# database sees a rotated or deleted token refused within this (this process: at once)
CALLER_CACHE_TTL_S = 5.0
CALLER_CACHE_SIZE = 4096


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


class CallerCache:
    """Task servers' callers by token SHA-256, kept `ttl_s` (every request of a task server
    looked its token up in the database: 7 % of the NS's status-event ingest). Only found task
    servers are kept; an unknown token is looked up every time. Thread-safe."""

    def __init__(self, ttl_s: float = CALLER_CACHE_TTL_S, size: int = CALLER_CACHE_SIZE) -> None:
        self._cache: TTLCache[str, Caller] = TTLCache(maxsize=size, ttl=ttl_s)
        self._lock = threading.Lock()

    def get(self, sha: str) -> Caller | None:
        with self._lock:
            return self._cache.get(sha)

    def put(self, sha: str, caller: Caller) -> None:
        with self._lock:
            self._cache[sha] = caller

    def clear(self) -> None:
        """Forget every caller (a task server's token rotated, or a task server deleted)."""
        with self._lock:
            self._cache.clear()
