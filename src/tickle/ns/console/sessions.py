"""Console logins: a session cookie (HttpOnly, Secure, SameSite=Strict; the NS keeps only its
SHA-256, with who logged in and when it expires), a CSRF token on every form and action, and the
security headers of every console page.

The CSRF token of a session is an HMAC of its cookie: a page holds it in its forms, a forged form
from another site cannot know it. The login form, before any session, uses a double-submit token:
a random cookie that the form must repeat.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass
from urllib.parse import parse_qsl

from fastapi import HTTPException, Request, Response, status
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tickle.ns.stores.operators import OperatorStore

PREFIX = "/console"
COOKIE = "tickle_session"
LOGIN_CSRF_COOKIE = "tickle_login_csrf"
CSRF_FIELD = "csrf"
# forms are small: a larger body is not a console form
FORM_MAX_BYTES = 256 * 1024
# what every console answer carries: only our own scripts and styles, never framed, no referrer
HEADERS = {
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


class LoginThrottle:
    """Refused logins per client address: past `limit` within `window_s`, that address's logins
    are refused at once (429) without a token check or an audit row, so guessing tokens is slow
    and a flood of wrong ones cannot fill the audit. In memory, per NS process; at most
    `max_addresses` addresses are followed (the one refused longest ago is forgotten first)."""

    def __init__(
        self, limit: int = 10, window_s: float = 60.0, max_addresses: int = 10_000
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_addresses = max_addresses
        self._refused: OrderedDict[str, deque[float]] = OrderedDict()

    def blocked(self, address: str, now: float) -> bool:
        times = self._refused.get(address)
        if times is None:
            return False
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return len(times) >= self.limit

    def refused(self, address: str, now: float) -> None:
        times = self._refused.pop(address, None) or deque(maxlen=self.limit)
        times.append(now)
        self._refused[address] = times  # now the newest
        while len(self._refused) > self.max_addresses:
            self._refused.popitem(last=False)


class LoginNeeded(Exception):
    """A console page was asked for without a valid session: answered by the login page."""


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in operator: who ("admin" or an operator's name), and the session's CSRF token."""

    who: str
    token: str

    @property
    def csrf(self) -> str:
        return csrf_for(self.token)


def csrf_for(session_token: str) -> str:
    return hmac.new(session_token.encode(), b"tickle-console-csrf", hashlib.sha256).hexdigest()


def _operators(request: Request) -> OperatorStore:
    store: OperatorStore = request.app.state.services.operators
    return store


def current(request: Request) -> Session | None:
    """The request's session, if its cookie names an unexpired one."""
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 128:
        return None
    who = _operators(request).session_who(token)
    return Session(who, token) if who is not None else None


def page_session(request: Request) -> Session:
    """Dependency of every page: the session, or the login page."""
    session = current(request)
    if session is None:
        raise LoginNeeded
    return session


async def form_of(request: Request) -> dict[str, str]:
    """The urlencoded form of a console POST (one value per field; the last one wins)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != (
        "application/x-www-form-urlencoded"
    ):
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "a console form was expected")
    body = await request.body()
    if len(body) > FORM_MAX_BYTES:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, "form too large")
    try:
        return dict(parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=1000))
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "unreadable form") from None


async def action_form(request: Request) -> tuple[Session, dict[str, str]]:
    """Dependency of every action (POST): a session (403 without) and its CSRF token in the form
    (403 when missing or wrong), and the form."""
    session = current(request)
    if session is None:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "log in to the console first")
    form = await form_of(request)
    if not hmac.compare_digest(form.get(CSRF_FIELD, ""), session.csrf):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "missing or wrong CSRF token")
    return session, form


def set_session_cookie(response: Response, token: str, max_age: float) -> None:
    response.set_cookie(
        COOKIE,
        token,
        max_age=int(max_age),
        path=PREFIX,
        secure=True,
        httponly=True,
        samesite="strict",
    )


def new_login_csrf() -> str:
    """A double-submit token for the login form (as a cookie, and in the form)."""
    return secrets.token_urlsafe(32)


def set_login_csrf(response: Response, token: str) -> None:
    response.set_cookie(
        LOGIN_CSRF_COOKIE, token, path=PREFIX, secure=True, httponly=True, samesite="strict"
    )


def check_login_csrf(request: Request, form: dict[str, str]) -> None:
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    sent = form.get(CSRF_FIELD, "")
    if not cookie or not hmac.compare_digest(cookie, sent):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "missing or wrong CSRF token")


class ConsoleHeaders:
    """ASGI middleware: the security headers on every answer under /console."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(PREFIX):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {bytes(k).lower() for k, _ in message.get("headers", [])}
                extra = [
                    (k.encode(), v.encode()) for k, v in HEADERS.items() if k.encode() not in names
                ]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
